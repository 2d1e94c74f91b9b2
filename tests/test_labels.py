"""Scored CinC 2021 classes, the PTB-XL SCP mapping, and pseudonymisation."""

import csv
from pathlib import Path

import numpy as np
import pytest

import ecgplat
from ecgplat import labels
from ecgplat.privacy import pseudonymise

SCORING = Path(ecgplat.__file__).parent / "data" / "scoring"


def _header(name):
    with open(SCORING / name, newline="") as f:
        return next(csv.reader(f))[1:]


def test_classes_follow_the_weights_csv_header():
    header = _header("weights.csv")
    assert len(labels.CLASSES) == 26 and header == labels.CLASS_NAMES
    assert [set(c) for c in labels.CLASSES] == [set(h.split("|")) for h in header]
    assert _header("weights_abbreviations.csv") == labels.ABBREVIATIONS
    assert labels.ABBREVIATIONS[labels.NORMAL_INDEX] == "NSR"
    assert labels.NORMAL_INDEX == 14
    # the four merged equivalence classes of the challenge
    merged = {frozenset(c) for c in labels.CLASSES if len(c) == 2}
    assert merged == {
        frozenset({"733534002", "164909002"}),
        frozenset({"713427006", "59118001"}),
        frozenset({"284470004", "63593006"}),
        frozenset({"427172004", "17338001"}),
    }


def test_weights_matrix():
    w = labels.WEIGHTS
    assert w.shape == (26, 26) and w.dtype == np.float64
    assert np.allclose(np.diag(w), 1.0) and np.allclose(w, w.T)
    with open(SCORING / "weights.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert w[0, 1] == float(rows[1][2]) and w[25, 3] == float(rows[26][4])


def test_codes_to_multihot_equivalence_and_unscored():
    y = labels.codes_to_multihot(["164909002", "59118001", "55930002", " 426783006"])
    abbrev = [labels.ABBREVIATIONS[i] for i in np.flatnonzero(y)]
    assert abbrev == ["CLBBB|LBBB", "CRBBB|RBBB", "NSR"]
    assert y.dtype == bool and y.shape == (26,)
    assert not labels.codes_to_multihot([]).any()
    assert not labels.codes_to_multihot(["55930002", "x"]).any()  # unscored / junk: no label


def _abbr(codes):
    return sorted(labels.ABBREVIATIONS[i] for i in np.flatnonzero(labels.codes_to_multihot(codes)))


@pytest.mark.parametrize(
    "scp,axis,expected",
    [
        ({"NORM": 100.0, "SR": 0.0}, None, ["NSR"]),
        ({"NORM": 80.0, "SBRAD": 0.0}, "", ["SB"]),
        ({"LPFB": 100.0, "SR": 0.0}, "RAD", ["NSR", "RAD"]),
        ({"NORM": 50.0, "AFIB": 0.0}, float("nan"), ["AF"]),
        ({"1AVB": 100.0, "NDT": 100.0, "SR": 0.0}, "ALAD", ["IAVB", "LAD", "NSR", "TAb"]),
        ({"CLBBB": 100.0}, "ARAD", ["CLBBB|LBBB", "RAD"]),
        ({"PAC": 100.0, "SVARR": 0.0, "PVC": 100.0}, "MID", ["PAC|SVPB", "PVC|VPB"]),
        ({"IMI": 100.0, "ABQRS": 0.0, "LOWT": 0.0, "LVH": 50.0}, None, []),
        (
            {"QWAVE": 0.0, "INVT": 0.0, "LNGQT": 0.0, "LVOLT": 0.0},
            None,
            ["LQRSV", "LQT", "QAb", "TInv"],
        ),
    ],
)
def test_scp_to_snomed(scp, axis, expected):
    assert _abbr(labels.scp_to_snomed(scp, axis)) == expected


def test_scp_mapping_keys_are_real_statements_with_matching_meaning(samples_dir):
    with open(samples_dir / "ptbxl" / "scp_statements.csv", newline="") as f:
        desc = {r[""]: r["description"].lower() for r in csv.DictReader(f)}
    assert set(labels.PTBXL_SCP_TO_SNOMED) <= set(desc)
    with open(SCORING / "dx_mapping_scored.csv", newline="") as f:
        dx = {r["SNOMEDCTCode"]: r["Dx"].lower() for r in csv.DictReader(f)}
    # spot checks that the statement and the challenge diagnosis say the same thing
    for scp, word in [
        ("AFIB", "atrial fibrillation"),
        ("AFLT", "atrial flutter"),
        ("STACH", "sinus tachycardia"),
        ("SBRAD", "sinus bradycardia"),
        ("IRBBB", "incomplete right bundle branch block"),
        ("LAFB", "left anterior fascicular block"),
        ("SARRH", "sinus arrhythmia"),
    ]:
        assert word in desc[scp] and word in dx[labels.PTBXL_SCP_TO_SNOMED[scp]]


def test_pseudonymise():
    a = pseudonymise("13243", b"secret")
    assert a.startswith("p-") and len(a) == 18 and all(c in "0123456789abcdef" for c in a[2:])
    assert a == pseudonymise("13243", b"secret")
    assert a != pseudonymise("13243", b"other") and a != pseudonymise("13244", b"secret")
    assert "13243" not in a
    import hashlib
    import hmac

    assert a[2:] == hmac.new(b"secret", b"13243", hashlib.sha256).hexdigest()[:16]
    with pytest.raises(ValueError):
        pseudonymise("1", b"")
