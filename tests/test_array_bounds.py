"""`ingest numpy` refuses an array that declares too many samples from its header alone: the
.npy header (shape, dtype) and an .npz member's size in the zip directory are checked before a
sample is read, so a sparse file, a zip bomb or an hours-long array costs no more memory than a
good record (issue 20, item 1). Peak memory is measured in a fresh subprocess (VmHWM)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hostile_files import measured

from ingestion.readers import numpy_arrays
from ingestion.readers.options import ReadOptions
from ingestion.readers.record import RecordError

REPO = Path(__file__).parents[1]
LEADS12 = "I,II,III,aVR,aVL,aVF,V1,V2,V3,V4,V5,V6"
MIB = 1 << 20


def _npy_header(shape, descr: str) -> bytes:
    buf = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def sparse_npy(path: Path, shape, descr: str) -> Path:
    """An .npy whose header declares ``shape``; the data is a hole (no disk, no memory)."""
    header = _npy_header(shape, descr)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + int(np.prod(shape)) * np.dtype(descr).itemsize)
    return path


def zip_bomb(path: Path, shape, descr: str, extra: int = 0) -> Path:
    """An .npz whose one member ``signal.npy`` is ``shape`` zeros (plus ``extra`` trailing zero
    bytes), deflated: a few hundred kB on disk."""
    zeros = bytes(MIB)
    left = int(np.prod(shape)) * np.dtype(descr).itemsize + extra
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf,
        zf.open("signal.npy", "w", force_zip64=True) as member,
    ):
        member.write(_npy_header(shape, descr))
        while left > 0:
            member.write(zeros[: min(left, MIB)])
            left -= MIB
    return path


def probe(src: Path, rel: str) -> dict:
    """read_record of ``rel`` in a fresh interpreter: its reason, peak RSS before and after."""
    setup = "from pathlib import Path\nfrom ingestion.readers import numpy_arrays\n"
    setup += "from ingestion.readers.options import ReadOptions\n"
    setup += "from ingestion.readers.record import RecordError"
    code = """
try:
    opts = ReadOptions(fs=500.0, leads=sys.argv[3])
    numpy_arrays.read_record(Path(sys.argv[1]), sys.argv[2], opts)
    result = {"reason": None}
except RecordError as e:
    result = {"reason": e.reason}
"""
    return measured(REPO, setup, code, src, rel, LEADS12)


# each declares 5,000 s at 500 Hz (12 leads): 120-240 MB the reader must never load
HOSTILE = {
    "sparse.npy": lambda p: sparse_npy(p, (12, 2_500_000), "<f8"),
    "long_f32_samples_first.npy": lambda p: sparse_npy(p, (2_500_000, 12), "<f4"),
    "bomb.npz": lambda p: zip_bomb(p, (12, 2_500_000), "<f8"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_declared_duration_is_refused_before_any_sample_is_read(tmp_path, name):
    path = HOSTILE[name](tmp_path / name)
    assert path.stat().st_blocks * 512 < 4 * MIB  # sparse or deflated: nothing on disk
    r = probe(tmp_path, name)
    assert r["reason"] == "duration 5000 s exceeds the maximum 3600 s (--max-duration)", r
    grown = (r["peak"] - r["before"]) / MIB
    assert grown < 16, f"{name}: peak RSS grew {grown:.0f} MiB reading a refused array"
    assert r["seconds"] < 5, r


def test_a_good_array_still_reads_through_the_checked_path(tmp_path):
    x = np.random.default_rng(0).normal(size=(12, 5000)).astype(">f4")  # big-endian too
    np.save(tmp_path / "a.npy", x)
    np.save(tmp_path / "f.npy", np.asfortranarray(x.T.astype(np.int16)))
    np.savez_compressed(tmp_path / "z.npz", signal=x)
    opts = ReadOptions(fs=500.0, leads=LEADS12)
    for name, want in (("a.npy", x), ("f.npy", x.astype(np.int16)), ("z.npz", x)):
        got = numpy_arrays.read_record(tmp_path, name, opts).signal
        np.testing.assert_array_equal(got, want.astype(np.float32))


def test_sizes_that_disagree_with_the_header_are_refused(tmp_path):
    """Truncated or trailing data in an .npy, and an .npz member larger in the zip directory
    than any record within the bounds, are refused before their samples are read."""
    x = np.zeros((12, 5000), np.float32)
    np.save(tmp_path / "cut.npy", x)
    data = (tmp_path / "cut.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[:-4])
    (tmp_path / "tail.npy").write_bytes(data + b"\0" * 4)
    zip_bomb(tmp_path / "tail.npz", (12, 5000), "<f4", extra=2 * MIB)
    opts = ReadOptions(fs=500.0, leads=LEADS12, max_seconds=10)
    for name in ("cut.npy", "tail.npy"):
        with pytest.raises(RecordError, match=r"array data holds \d+ bytes but its header implies"):
            numpy_arrays.read_record(tmp_path, name, opts)
    with pytest.raises(RecordError, match=r"^tail.npz: npz member holds 2337\d+ bytes"):
        numpy_arrays.read_record(tmp_path, "tail.npz", opts)
