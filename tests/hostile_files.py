"""Writers of real, deliberately broken corpus files for the hostile-input tests (WFDB .hea/.dat
via wfdb, CinC .hea + MATLAB v4 .mat by hand, PTB-XL csv)."""

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
