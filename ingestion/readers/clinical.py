"""What the vendor-format readers share: safe XML parsing, and the few patient fields they keep.

The hospital exports (GE MUSE, Philips, HL7 aECG, DICOM, SCP-ECG, EDF) carry identifying data next
to the signal. Their readers work by allow-list: they read only the fields named here (the patient
identifier, which the store turns into its keyed pseudonym; sex; age) and never copy any other
field into a record, a reason or a log. Age is kept in whole years and capped at ``MAX_AGE``
(HIPAA Safe Harbor); when a file gives a birth date and an acquisition date instead, it is
computed from the two and the dates themselves are dropped.
"""

from __future__ import annotations

import datetime as _dt
import math

from ingestion.readers.record import RecordError

MAX_AGE = 90  # Safe Harbor: ages over 89 are aggregated into one category
MAX_XML_BYTES = 64 * 1024 * 1024  # larger vendor XML files are refused before parsing


def safe_age(years: float | None) -> float:
    """An age in whole years, capped at ``MAX_AGE``; NaN when unknown or implausible (< 0)."""
    if years is None or not math.isfinite(years) or years < 0:
        return math.nan
    return float(min(int(years), MAX_AGE))


def age_from_dates(birth: _dt.date | None, acquired: _dt.date | None) -> float:
    """Completed years between a birth date and an acquisition date, capped (``safe_age``)."""
    if birth is None or acquired is None or acquired < birth:
        return math.nan
    years = acquired.year - birth.year - ((acquired.month, acquired.day) < (birth.month, birth.day))
    return safe_age(years)


def parse_xml(data: bytes, rel: str):
    """The root element of a vendor XML document, parsed by defusedxml: entity declarations
    (billion laughs), external entities and DTD retrieval are refused with a ``RecordError``
    naming ``rel``, never resolved. The DOCTYPE line itself (MUSE's ``restecg.dtd``) is allowed
    but never fetched."""
    from xml.etree.ElementTree import ParseError

    from defusedxml import DefusedXmlException
    from defusedxml.ElementTree import fromstring

    if len(data) > MAX_XML_BYTES:
        raise RecordError(rel, f"XML file of {len(data)} bytes exceeds {MAX_XML_BYTES}")
    try:
        return fromstring(data, forbid_dtd=False, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as e:
        raise RecordError(rel, f"unsafe XML refused: {type(e).__name__}") from None
    except ParseError as e:
        raise RecordError(rel, f"not well-formed XML: {e}") from None


def local_name(tag: str) -> str:
    """An element's tag without its ``{namespace}``."""
    return tag.rpartition("}")[2]
