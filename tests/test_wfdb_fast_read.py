"""The format-16 fast path of ``ingestion.readers.wfdb_header.read_digital`` gives exactly what
wfdb's general decoder gives (real samples, a byte offset, WFDB's invalid-sample value)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ingestion.readers.wfdb_header as W

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"


def _both(folder: Path, stem: str, monkeypatch) -> tuple[np.ndarray | None, np.ndarray]:
    _, hdr = W.read_header(folder, stem)
    fast = W._read_format16(hdr, folder, hdr["sig_len"])
    with monkeypatch.context() as m:
        m.setattr(W, "_read_format16", lambda *a: None)
        general = W.read_digital(hdr, folder, hdr["sig_len"])
    return fast, general


@pytest.mark.parametrize(
    "hea",
    [p for p in sorted(SAMPLES.rglob("*.hea")) if p.with_suffix(".dat").is_file()],
    ids=lambda p: str(p.relative_to(SAMPLES)),
)
def test_fast_path_equals_wfdb_decoder_on_real_records(hea, monkeypatch):
    fast, general = _both(hea.parent, hea.stem, monkeypatch)
    _, hdr = W.read_header(hea.parent, hea.stem)
    single16 = all(s["fmt"] == "16" and s["spf"] == 1 for s in hdr["signals"]) and (
        len({s["file"] for s in hdr["signals"]}) == 1
    )
    assert (fast is not None) == single16
    if fast is not None:
        assert fast.dtype == general.dtype and np.array_equal(fast, general, equal_nan=True)


def test_offset_and_invalid_samples(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    values = rng.integers(-3000, 3000, size=(700, 3)).astype("<i2")
    values[5, 1] = values[600, 0] = -32768  # WFDB's invalid sample of format 16
    (tmp_path / "r.dat").write_bytes(b"\x07" * 24 + values.tobytes())
    lines = ["r 3 500 700"] + [f"r.dat 16+24 200/mV 16 0 0 0 0 L{k}" for k in range(3)]
    (tmp_path / "r.hea").write_text("\n".join(lines) + "\n")
    fast, general = _both(tmp_path, "r", monkeypatch)
    assert np.array_equal(fast, general, equal_nan=True)
    assert np.isnan(fast[5, 1]) and np.isnan(fast[600, 0]) and np.isnan(fast).sum() == 2
    assert fast[0, 2] == float(values[0, 2])
