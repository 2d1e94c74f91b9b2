"""Lead vocabulary: canonical names, presets, subset masking (numpy and torch)."""

import numpy as np
import pytest

from ecgplat.leads import (
    LEAD_PRESETS,
    LEADS,
    apply_lead_subset,
    canonical_lead,
    lead_mask,
    parse_leads,
)


def test_canonical_order():
    assert LEADS == ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")


@pytest.mark.parametrize(
    "name,expected",
    [
        ("i", "I"),
        ("II", "II"),
        ("iii", "III"),
        ("AVR", "aVR"),
        ("aVR", "aVR"),
        ("avl", "aVL"),
        ("aVF", "aVF"),
        ("v1", "V1"),
        ("V6", "V6"),
        (" v3 ", "V3"),
        ("MLII", "II"),
        ("mli", "I"),
        ("vx", None),
        ("vy", None),
        ("vz", None),
        ("PLETH", None),
        ("ABP", None),
        ("resp", None),
        ("ECG", None),
        ("V", None),
        ("V7", None),
        ("", None),
    ],
)
def test_canonical_lead(name, expected):
    assert canonical_lead(name) == expected


def test_presets_are_the_papers_lead_sets():
    idx = {k: parse_leads(k) for k in LEAD_PRESETS}
    assert idx["12"] == tuple(range(12))
    assert idx["6"] == (0, 1, 2, 3, 4, 5)
    assert idx["4"] == (0, 1, 2, 7)
    assert idx["3"] == (0, 1, 7)
    assert idx["2"] == (0, 1)
    assert idx["1"] == (0,)


def test_parse_leads_forms():
    assert parse_leads("I,II,V2") == (0, 1, 7)
    assert parse_leads("[avr, i]") == (0, 3)
    assert parse_leads(["V6", "v1"]) == (6, 11)
    assert parse_leads([11, 0]) == (0, 11)
    assert parse_leads("II,ii") == (1,)


@pytest.mark.parametrize("spec,bad", [("I,V7", "V7"), (["II", "pleth"], "pleth"), ("vx", "vx")])
def test_parse_leads_names_the_bad_lead(spec, bad):
    with pytest.raises(ValueError, match=bad):
        parse_leads(spec)


def test_parse_leads_rejects_empty_and_out_of_range():
    with pytest.raises(ValueError):
        parse_leads("")
    with pytest.raises(ValueError, match="12"):
        parse_leads([12])


def test_lead_mask():
    m = lead_mask((0, 7))
    assert m.dtype == bool and m.shape == (12,)
    assert np.flatnonzero(m).tolist() == [0, 7]


def test_apply_lead_subset_numpy_copies_and_zero_fills():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 12, 50)).astype(np.float32)
    y = apply_lead_subset(x, parse_leads("3"))
    keep = [0, 1, 7]
    drop = [i for i in range(12) if i not in keep]
    assert np.array_equal(y[:, keep], x[:, keep])
    assert not y[:, drop].any()
    assert x[:, drop].any()  # input untouched
    with pytest.raises(ValueError):
        apply_lead_subset(x[:, :6], (0,))


def test_apply_lead_subset_torch():
    torch = pytest.importorskip("torch")
    x = torch.randn(2, 12, 20)
    y = apply_lead_subset(x, (1,))
    assert torch.equal(y[:, 1], x[:, 1])
    assert y[:, [0] + list(range(2, 12))].abs().sum() == 0
    assert x[:, 0].abs().sum() > 0
    single = apply_lead_subset(torch.randn(12, 7), (0, 5))  # no batch dim
    assert single[1:5].abs().sum() == 0 and single[6:].abs().sum() == 0
