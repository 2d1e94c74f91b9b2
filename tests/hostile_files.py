"""Writers of real, deliberately broken corpus files for the hostile-input tests (WFDB .hea/.dat
via wfdb, CinC .hea + MATLAB v4 .mat by hand, PTB-XL csv) and of hostile vendor files (XML
billion laughs and external entities, oversized base64, a DICOM declaring a huge waveform, an
SCP-ECG section past the end of the file, an EDF whose record count disagrees with its size)."""

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io
import wfdb

LEADS12 = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]


def ecg(n_sig: int, n: int, seed: int = 0) -> np.ndarray:
    """(n, n_sig) float mV: a different smooth waveform per lead (so a scramble is visible)."""
    t = np.arange(n) / 500.0
    rng = np.random.default_rng(seed)
    cols = [
        np.sin(2 * np.pi * (1 + k) * 0.7 * t + k) + 0.05 * rng.normal(size=n) for k in range(n_sig)
    ]
    return np.stack(cols, axis=1)


def write_wfdb(
    folder: Path, name: str, n_sig=3, seconds=10.0, fs=500, fmt="16", names=None, seed=0
) -> Path:
    """A WFDB record ``folder/name`` (.hea + .dat) in sample format ``fmt``."""
    folder.mkdir(parents=True, exist_ok=True)
    n = int(seconds * fs)
    sig = ecg(n_sig, n, seed)
    names = names or (LEADS12 * 2)[:n_sig]
    wfdb.wrsamp(
        "rec",
        fs=fs,
        units=["mV"] * n_sig,
        sig_name=names,
        p_signal=sig,
        fmt=[fmt] * n_sig,
        adc_gain=[50.0 if fmt in ("8", "80") else 1000.0] * n_sig,
        baseline=[0] * n_sig,
        write_dir=str(folder),
    )
    # wfdb's header parser cannot take non-ASCII names: write as "rec", then rename
    text = (
        (folder / "rec.hea")
        .read_text()
        .replace("rec.dat", f"{name}.dat")
        .replace("rec ", f"{name} ", 1)
    )
    (folder / "rec.hea").unlink()
    (folder / f"{name}.hea").write_text(text, encoding="utf-8")
    (folder / "rec.dat").rename(folder / f"{name}.dat")
    return folder / name


def edit_header(base: Path, fn) -> None:
    """Rewrite ``base.hea`` with ``fn(list of lines) -> list of lines``."""
    hea = base.with_suffix(".hea")
    lines = hea.read_text(encoding="utf-8").splitlines()
    hea.write_text("\n".join(fn(lines)) + "\n", encoding="utf-8")


def write_cinc(folder: Path, name: str, seconds=10.0, fs=500, patient=None, mat=None) -> Path:
    """A CinC 2021 record: header in the challenge dialect, MATLAB v4 ``val`` int16 (gain 1000)."""
    folder.mkdir(parents=True, exist_ok=True)
    n = int(seconds * 500)
    val = np.round(ecg(12, n).T * 1000).astype(np.int16)
    scipy.io.savemat(folder / f"{name}.mat", {"val": val}, format="4")
    lines = [f"{name} 12 {fs} {n}"]
    for lead, first in zip(LEADS12, val[:, 0], strict=True):
        lines.append(f"{mat or name + '.mat'} 16+24 1000/mV 16 0 {int(first)} 0 0 {lead}")
    lines += ["#Age: 50", "#Sex: Male", "#Dx: 426783006"]
    if patient:
        lines.append(f"#Patient: {patient}")
    (folder / f"{name}.hea").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / name


def write_ptbxl(root: Path, rows: list[dict]) -> None:
    """A PTB-XL root: ``ptbxl_database.csv`` with ``rows`` (``filename_hr`` records written
    12-lead 500 Hz unless the row has ``_no_file``)."""
    root.mkdir(parents=True, exist_ok=True)
    table = []
    for i, row in enumerate(rows):
        rel = row["filename_hr"]
        if not row.pop("_no_file", False):
            path = root / rel
            write_wfdb(path.parent, path.name, n_sig=12, seed=i)
        table.append(
            {
                "ecg_id": i + 1,
                "patient_id": 1000.0 + i,
                "age": 60,
                "sex": 0,
                "scp_codes": "{'NORM': 100.0}",
                "heart_axis": "",
                "strat_fold": 1 + i % 10,
                **row,
            }
        )
    pd.DataFrame(table).to_csv(root / "ptbxl_database.csv", index=False)


def declare_samples(base: Path, n_samples: int, with_length: bool = True) -> None:
    """Make the 12-lead format-16 record ``base`` (.hea + .dat or .mat) declare ``n_samples``:
    the header's record line says so (or gives no length, which the .dat's size then implies)
    and the data file becomes a sparse file of the matching size (no disk, no memory)."""
    data = next(p for p in (base.with_suffix(".dat"), base.with_suffix(".mat")) if p.exists())
    size = n_samples * 12 * 2 + (24 if data.suffix == ".mat" else 0)

    def record_line(lines):
        name, n_sig, fs = lines[0].split()[:3]
        return [" ".join([name, n_sig, fs] + ([str(n_samples)] if with_length else [])), *lines[1:]]

    edit_header(base, record_line)
    with open(data, "wb") as f:
        f.truncate(size)


_MEASURE = """
import json, sys, time
def _peak():  # VmHWM: unlike ru_maxrss, not inherited from the parent across fork and exec
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))
{setup}
_before, _t0 = _peak(), time.perf_counter()
{code}
print(json.dumps(dict(result, before=_before, peak=_peak(), seconds=time.perf_counter() - _t0)))
"""


def measured(repo: Path, setup: str, code: str, *args) -> dict:
    """Run ``setup`` then ``code`` (which sets ``result``, a dict) in a fresh interpreter on the
    package at ``repo``, ``args`` in ``sys.argv[1:]``: ``result`` plus the peak RSS (bytes)
    before and after ``code`` and the seconds ``code`` took."""
    import json
    import os
    import subprocess
    import sys

    script = _MEASURE.format(setup=setup, code=code)
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", script, *map(str, args)]
    out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


# ---- hostile vendor files (ingest auto; shared with bench/faults.py) ---------------------------

MUSE_ROOT = "<RestingECG><PatientDemographics><PatientID>{raw}</PatientID></PatientDemographics>"


def write_billion_laughs(path: Path, raw: str = "HOSTILE-1") -> Path:
    """A MUSE root behind nested entity declarations (the billion laughs)."""
    ents = ['<!ENTITY a0 "lol">'] + [f'<!ENTITY a{i} "{f"&a{i - 1};" * 10}">' for i in range(1, 10)]
    body = MUSE_ROOT.format(raw=raw) + "&a9;</RestingECG>"
    path.write_text(f'<?xml version="1.0"?>\n<!DOCTYPE RestingECG [{"".join(ents)}]>\n{body}')
    return path


def write_xxe(path: Path, raw: str = "HOSTILE-2") -> Path:
    """A Philips root whose patient id is an external entity (a local file)."""
    path.write_text(
        '<?xml version="1.0"?>\n<!DOCTYPE restingecgdata [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        f'<restingecgdata xmlns="http://www3.medical.philips.com"><patient><patientid>{raw}&x;'
        "</patientid></patient></restingecgdata>"
    )
    return path


def write_oversized_base64(path: Path, raw: str = "HOSTILE-3", mb: int = 65) -> Path:
    """A MUSE file whose one lead's base64 payload makes the file larger than any reader reads
    (``clinical.MAX_XML_BYTES``, 64 MB)."""
    head = MUSE_ROOT.format(raw=raw) + "<Waveform><WaveformType>Rhythm</WaveformType><LeadData>"
    with open(path, "w") as f:
        f.write(f'<?xml version="1.0"?>\n{head}<LeadID>I</LeadID><WaveFormData>')
        chunk = "QUFBQUFB" * 131072  # 1 MiB of base64
        for _ in range(mb):
            f.write(chunk)
        f.write("</WaveFormData></LeadData></Waveform></RestingECG>")
    return path


def write_dicom_huge_waveform(path: Path, sample: Path) -> Path:
    """A DICOM ECG (a copy of ``sample``) whose first multiplex group declares 2**31 - 1
    samples per channel, far more than its waveform data holds."""
    import pydicom

    ds = pydicom.dcmread(sample)
    ds.WaveformSequence[0].NumberOfWaveformSamples = 2**31 - 1
    ds.save_as(path)
    return path


def write_scp_section_past_eof(path: Path, sample: Path) -> Path:
    """An SCP-ECG file (a copy of ``sample``) whose section 6 pointer claims a length past the
    end of the file; section 0's CRC is recomputed, so the file still looks like SCP-ECG."""
    from ingestion.readers.detect import crc_ccitt

    data = bytearray(sample.read_bytes())
    length = int.from_bytes(data[10:14], "little")
    for at in range(22, 6 + length, 10):
        if int.from_bytes(data[at : at + 2], "little") == 6:
            data[at + 2 : at + 6] = (len(data) * 4).to_bytes(4, "little")
    data[6:8] = crc_ccitt(bytes(data[8 : 6 + length])).to_bytes(2, "little")
    path.write_bytes(bytes(data))
    return path


def write_edf_wrong_record_count(path: Path, records: int = 10, fs: int = 500) -> Path:
    """A one-channel EDF file holding ``records`` one-second data records whose header
    declares ten times as many."""

    def field(value, width: int) -> bytes:
        return f"{value:<{width}}".encode()

    head = b"".join(
        [
            field(0, 8),
            field("X X X X", 80),
            field("Startdate X X X X", 80),
            field("01.01.20", 8),
            field("00.00.00", 8),
            field(512, 8),
            field("", 44),
            field(records * 10, 8),
            field(1, 8),
            field(1, 4),
        ]
    )
    signal = [("ECG I", 16), ("", 80), ("uV", 8), (-3200, 8), (3200, 8), (-32768, 8)]
    signal += [(32767, 8), ("", 80), (fs, 8), ("", 32)]
    head += b"".join(field(v, w) for v, w in signal)
    data = (ecg(1, records * fs)[:, 0] * 10000).astype("<i2").tobytes()
    path.write_bytes(head + data)
    return path
