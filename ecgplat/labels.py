r"""The 26 scored PhysioNet/CinC 2021 classes, their weights, and the PTB-XL → SNOMED mapping.

Classes come from the challenge's final ``weights.csv`` (package data in
``ecgplat/data/scoring``, BSD-2 licence beside it). Each header entry is one class; an entry such
as ``733534002|164909002`` is an equivalence class, i.e. a set of SNOMED-CT codes that count as the
same label. Class order is the csv header order, which is the model's output order.

PTB-XL mapping (``PTBXL_SCP_TO_SNOMED``)
-----------------------------------------
Source: our clinical reading of the SCP-ECG statement descriptions in PTB-XL's
``scp_statements.csv`` matched against the diagnosis names in the challenge's
``dx_mapping_scored.csv``; where the challenge's own PTB_XL count column equals the PTB-XL
statement count, that confirms the pairing.

=========  ==========================================  ==========  =======
SCP        PTB-XL description                          SNOMED      class
=========  ==========================================  ==========  =======
SR         sinus rhythm                                426783006   NSR
AFIB       atrial fibrillation                         164889003   AF
AFLT       atrial flutter                              164890007   AFL
STACH      sinus tachycardia                           427084000   STach
SBRAD      sinus bradycardia                           426177001   SB
SARRH      sinus arrhythmia                            427393009   SA
1AVB       first degree AV block                       270492004   IAVB
LPR        prolonged PR interval                       164947007   LPR
CLBBB      complete left bundle branch block           733534002   CLBBB|LBBB
CRBBB      complete right bundle branch block          713427006   CRBBB|RBBB
IRBBB      incomplete right bundle branch block        713426002   IRBBB
LAFB       left anterior fascicular block              445118002   LAnFB
IVCD       non-specific intraventricular conduction    698252002   NSIVCB
LVOLT      low QRS voltages                            251146004   LQRSV
LNGQT      long QT-interval                            111975006   LQT
PACE       normal functioning artificial pacemaker     10370003    PR
PAC        atrial premature complex                    284470004   PAC|SVPB
SVARR      supraventricular arrhythmia                 63593006    PAC|SVPB
PVC        ventricular premature complex               427172004   PVC|VPB
QWAVE      Q waves present                             164917005   QAb
NDT        non-diagnostic T abnormalities              164934002   TAb
NT\_       non-specific T-wave changes                 164934002   TAb
TAB\_      T-wave abnormality                          164934002   TAb
INVT       inverted T-waves                            59931005    TInv
=========  ==========================================  ==========  =======

The ``heart_axis`` column maps separately (``HEART_AXIS_TO_SNOMED``): LAD, ALAD → 39732003 (LAD);
RAD, ARAD → 47665007 (RAD); MID, AXL, AXR, SAX → nothing.

Deliberately left unmapped (no scored class has that meaning): ABQRS ("abnormal QRS": the
challenge maps it to the *unscored* 164951009, not to Q-wave abnormal), LOWT (low-amplitude T is
not called abnormal/inverted T), NORM (a whole-ECG verdict, not a rhythm), all infarction,
ischaemia, injury, hypertrophy and atrial-enlargement statements, ST statements (STD\_, STE\_,
NST\_, ISC\_…), LPFB, ILBBB, WPW, 2AVB, 3AVB, BIGU, TRIGU, PRC(S), SVTAC, PSVT, DIG, EL, ANEUR,
HVOLT, VCLVH. Note on PVC: the challenge's own conversion of PTB-XL put PVC under the unscored
"ventricular ectopics" (164884008); a ventricular premature complex *is* a PVC, so we map it to
the scored PVC class. A record whose statements map to no class is valid: all-zero labels.

LUDB mapping (``LUDB_TO_SNOMED``, ``ludb_to_snomed``): LUDB's free-text diagnosis statements,
mapped the same way; the table, and what stays unmapped and why, are in ``docs/labels.md``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping
from importlib import resources

import numpy as np


def _read_table(name: str) -> tuple[list[str], np.ndarray]:
    text = resources.files("ecgplat").joinpath("data", "scoring", name).read_text(encoding="utf-8")
    rows = [r for r in csv.reader(io.StringIO(text)) if r]
    header = [h.strip() for h in rows[0][1:]]
    weights = np.array([[float(v) for v in r[1:]] for r in rows[1:]], dtype=np.float64)
    return header, weights


CLASS_NAMES, WEIGHTS = _read_table("weights.csv")
ABBREVIATIONS, _abbrev_weights = _read_table("weights_abbreviations.csv")
CLASSES: list[frozenset[str]] = [frozenset(c.split("|")) for c in CLASS_NAMES]
NUM_CLASSES = len(CLASSES)

assert WEIGHTS.shape == (NUM_CLASSES, NUM_CLASSES), WEIGHTS.shape
assert np.array_equal(WEIGHTS, _abbrev_weights) and len(ABBREVIATIONS) == NUM_CLASSES

_CODE_TO_CLASS: dict[str, int] = {code: i for i, cls in enumerate(CLASSES) for code in cls}

NORMAL_INDEX: int = next(i for i, cls in enumerate(CLASSES) if "426783006" in cls)
assert NUM_CLASSES == 26 and NORMAL_INDEX == 14, (NUM_CLASSES, NORMAL_INDEX)


def codes_to_multihot(codes: Iterable[str]) -> np.ndarray:
    """bool (26,): True for every scored class that one of ``codes`` (SNOMED strings) belongs to.
    Unscored codes are ignored."""
    out = np.zeros(NUM_CLASSES, dtype=bool)
    for code in codes:
        idx = _CODE_TO_CLASS.get(str(code).strip())
        if idx is not None:
            out[idx] = True
    return out


PTBXL_SCP_TO_SNOMED: dict[str, str] = {
    "SR": "426783006",
    "AFIB": "164889003",
    "AFLT": "164890007",
    "STACH": "427084000",
    "SBRAD": "426177001",
    "SARRH": "427393009",
    "1AVB": "270492004",
    "LPR": "164947007",
    "CLBBB": "733534002",
    "CRBBB": "713427006",
    "IRBBB": "713426002",
    "LAFB": "445118002",
    "IVCD": "698252002",
    "LVOLT": "251146004",
    "LNGQT": "111975006",
    "PACE": "10370003",
    "PAC": "284470004",
    "SVARR": "63593006",
    "PVC": "427172004",
    "QWAVE": "164917005",
    "NDT": "164934002",
    "NT_": "164934002",
    "TAB_": "164934002",
    "INVT": "59931005",
}

HEART_AXIS_TO_SNOMED: dict[str, str] = {
    "LAD": "39732003",
    "ALAD": "39732003",
    "RAD": "47665007",
    "ARAD": "47665007",
}

for _code in (*PTBXL_SCP_TO_SNOMED.values(), *HEART_AXIS_TO_SNOMED.values()):
    assert _code in _CODE_TO_CLASS, f"mapping target {_code} is not a scored code"


def scp_to_snomed(
    scp_codes: Mapping[str, float] | Iterable[str], heart_axis: str | None = None
) -> list[str]:
    """Scored SNOMED codes (sorted, unique) for a PTB-XL ``scp_codes`` dict (keys are statements,
    values likelihoods; every listed statement counts) and optionally its ``heart_axis`` value."""
    out = {PTBXL_SCP_TO_SNOMED[k] for k in scp_codes if k in PTBXL_SCP_TO_SNOMED}
    if isinstance(heart_axis, str) and heart_axis.strip() in HEART_AXIS_TO_SNOMED:
        out.add(HEART_AXIS_TO_SNOMED[heart_axis.strip()])
    return sorted(out)


# --- LUDB: diagnosis statements -> scored SNOMED codes (table and reasons in docs/labels.md) ---
# Keys are statements as LUDB writes them, lower case, without the trailing period.
LUDB_TO_SNOMED: dict[str, str] = {
    "rhythm: sinus rhythm": "426783006",
    "rhythm: sinus bradycardia": "426177001",
    "rhythm: sinus tachycardia": "427084000",
    "rhythm: sinus arrhythmia": "427393009",
    "rhythm: irregular sinus rhythm": "427393009",
    "rhythm: atrial fibrillation": "164889003",
    "rhythm: atrial flutter, typical": "164890007",
    "electric axis of the heart: left axis deviation": "39732003",
    "electric axis of the heart: right axis deviation": "47665007",
    "i degree av block": "270492004",
    "incomplete right bundle branch block": "713426002",
    "complete right bundle branch block": "713427006",
    "complete left bundle branch block": "733534002",
    "left anterior hemiblock": "445118002",
    "non-specific intravintricular conduction delay": "698252002",
    "unipolar ventricular pacing": "10370003",
    "bipolar ventricular pacing": "10370003",
    "biventricular pacing": "10370003",
    "unipolar atrial pacing": "10370003",
    "atrial extrasystole: sa-nodal extrasystole": "63593006",
}
# every statement starting with one of these is that kind of premature beat, whatever its
# type, localisation or morphology
LUDB_PREFIX_TO_SNOMED: dict[str, str] = {
    "atrial extrasystole": "284470004",
    "ventricular extrasystole": "427172004",
}

for _code in (*LUDB_TO_SNOMED.values(), *LUDB_PREFIX_TO_SNOMED.values()):
    assert _code in _CODE_TO_CLASS, f"mapping target {_code} is not a scored code"


def ludb_statement_key(statement: str) -> str:
    """A LUDB statement as a mapping key: lower case, spaces collapsed, trailing period gone."""
    return " ".join(str(statement).split()).rstrip(". ").lower()


def ludb_to_snomed(statements: Iterable[str]) -> list[str]:
    """Scored SNOMED codes (sorted, unique) of LUDB diagnosis statements; unmapped ones add
    nothing."""
    out = set()
    for statement in statements:
        key = ludb_statement_key(statement)
        code = LUDB_TO_SNOMED.get(key)
        if code is None:
            code = next((c for p, c in LUDB_PREFIX_TO_SNOMED.items() if key.startswith(p)), None)
        if code is not None:
            out.add(code)
    return sorted(out)


# --- class abbreviations (weights_abbreviations.csv) -> a SNOMED code of that class ---------
# "CLBBB|LBBB" names one class: both abbreviations give its first code, 733534002.
ABBREVIATION_TO_SNOMED: dict[str, str] = {
    abbrev: name.split("|")[0]
    for names, name in zip(ABBREVIATIONS, CLASS_NAMES, strict=True)
    for abbrev in names.split("|")
}
