"""Signal units: what a reader's samples are in, and what the store's ``units`` column says.

Readers hand over signals in millivolts (``RawRecord.units == "mV"``), or, only when the user
said how to treat a non-voltage unit, in that unit: ``"z"`` = standard deviations of a per-lead
z-score (e.g. a third party's preprocessed PTB-XL, WFDB unit ``z``). Conditioning scales every
signal by 1000 into int16 either way, so the store's per-record ``units`` column reads ``"uV"``
(microvolts) or ``"z"`` (1/1000 of a standard deviation per count).
"""

from __future__ import annotations

VOLTAGE = "mV"  # RawRecord.units of voltage signals (already scaled to millivolts)
NON_VOLTAGE = ("z",)  # non-voltage units a user may opt into with --units
STORE_UNITS = {"mV": "uV", "z": "z"}  # RawRecord.units -> the store's records/units value
ARRAY_UNITS = {"mv": ("mV", 1.0), "uv": ("mV", 1e-3), "µv": ("mV", 1e-3), "z": ("z", 1.0)}


def store_unit(signal_unit: str) -> str:
    """The store's ``units`` value for a signal in ``signal_unit`` (ValueError if unknown)."""
    try:
        return STORE_UNITS[signal_unit]
    except KeyError:
        raise ValueError(f"unknown signal unit {signal_unit!r}") from None


def accepted_unit(option: str | None) -> str | None:
    """The non-voltage unit a ``--units`` option for WFDB records opts into (None = voltages only);
    ValueError naming the allowed values otherwise."""
    if option is None:
        return None
    unit = str(option).strip()
    if unit.lower() in (u.lower() for u in NON_VOLTAGE):
        return unit.lower()
    if unit.lower() in ("mv", "uv", "µv", "v"):
        raise ValueError(
            f"--units {unit}: WFDB voltage units are read from each header; --units only opts "
            f"into a non-voltage unit ({', '.join(NON_VOLTAGE)})"
        )
    raise ValueError(f"--units {unit}: unknown unit (choose one of {', '.join(NON_VOLTAGE)})")


def array_unit(option: str | None) -> tuple[str, float]:
    """(signal unit, factor to it) for the values of a user's arrays: mV (default), uV or z."""
    key = "mv" if option is None else str(option).strip().lower()
    if key not in ARRAY_UNITS:
        raise ValueError(f"--units {option}: unknown unit (choose one of mV, uV, z)")
    return ARRAY_UNITS[key]


NOT_VOLTAGE = "no channel in voltage units"  # start of the reason below (retried with --units)


def not_voltage_reason(units: list[str]) -> str:
    """The reject reason of a record whose channels are all in non-voltage ``units``. Only a unit
    one can opt into (``NON_VOLTAGE``) is named, so the reason stays a fixed template and never
    quotes arbitrary header text."""
    known = sorted({str(u).strip().lower() for u in units} & set(NON_VOLTAGE))
    if not known:
        return f"{NOT_VOLTAGE} (mV, uV or V)"
    z = known[0]
    return (
        f"{NOT_VOLTAGE} (mV, uV or V): units {z!r}; if these are ECG leads in unit {z!r}, "
        f"ingest with --units {z}"
    )
