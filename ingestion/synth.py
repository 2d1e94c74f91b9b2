"""Synthetic 12-lead ECG cohorts in the PhysioNet/CinC 2021 on-disk format, for tests and demos.

Model. Every beat is a sum of Gaussian waves (P, Q, R, S, T, plus R' / f-waves where an
abnormality needs them). Each wave has a 3-D cardiac dipole direction; a lead sees the dipole
projected on its lead vector. Limb leads are derived from I and II exactly as a real machine does
(III = II - I, aVR = -(I+II)/2, aVL = I - II/2, aVF = II - I/2), so the leads are mutually
consistent. Per patient (stable across their records): wave amplitudes, widths, PR and QT base
intervals, the dipole directions (electrical axis), precordial electrode placement, age and sex.
Per record: heart rate, beat-to-beat variability, small amplitude/axis/electrode jitter,
baseline wander and noise.

Labels. With probability ``label_fraction`` a record gets one abnormality, drawn uniformly from
``ABNORMALITIES``; otherwise it is normal sinus rhythm (60-95 bpm). The signal carries what the
label says: SB 40-55 bpm, STach 105-145 bpm, AF irregular RR without P waves plus f-waves,
IAVB PR 0.26-0.34 s, CRBBB wide QRS with a late rightward-anterior R', CLBBB wide notched
leftward-posterior QRS without septal q and with discordant T, TInv inverted T. Sinus records
with a conduction/T finding also carry NSR, as in the challenge data.

Format. ``g<k>/S%06d.hea`` + ``.mat`` (at most 1000 records per ``g<k>``); headers in the
original challenge dialect (``16+24 1000/mV``, ``#Dx:``), MATLAB v4 ``val`` int16 in microvolts.
The challenge format has no patient field, so the generator adds a ``#Patient: <id>`` comment
line; the ``cinc2021`` reader returns it as ``patient_id`` (None for real challenge files). The
ids are synthetic (``SYN00001``...), not health data.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.io

from ecgplat.leads import LEADS

ABNORMALITIES: dict[str, tuple[str, ...]] = {
    "SB": ("426177001",),
    "STach": ("427084000",),
    "AF": ("164889003",),
    "IAVB": ("426783006", "270492004"),
    "CRBBB": ("426783006", "713427006"),
    "CLBBB": ("426783006", "733534002"),
    "TInv": ("426783006", "59931005"),
}
NORMAL_CODES = ("426783006",)
RATE_RANGES = {
    "SB": (40.0, 55.0),
    "STach": (105.0, 145.0),
    "AF": (75.0, 130.0),
    "normal": (60.0, 95.0),
}
WAVES = ("P", "Q", "R", "S", "T", "R2")  # R2: late R' (CRBBB) or notch (CLBBB); zero otherwise
RECORDS_PER_DIR = 1000
GAIN = 1000  # ADC units per mV: int16 values are microvolts

CHEST_GAIN = 1.6  # chest electrodes sit closer to the heart: larger amplitudes than limb leads
# Horizontal-plane angles (degrees, 0 = patient's left, 90 = anterior) of V1..V6.
_PRECORDIAL_DEG = np.array([115.0, 95.0, 75.0, 58.0, 35.0, 5.0])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _direction(rng, base, spread_deg):
    """``base`` (3,) rotated by a random perturbation of about ``spread_deg`` degrees."""
    return _unit(np.asarray(base, float) + rng.normal(0, np.deg2rad(spread_deg), 3))


def make_patient(rng: np.random.Generator) -> dict:
    """Stable per-patient morphology. Axes: x = left, y = inferior (feet), z = anterior."""
    axis = np.deg2rad(rng.uniform(-15, 85))  # frontal QRS axis
    back = np.deg2rad(rng.uniform(-35, -5))  # QRS points posterior
    r_dir = np.array([np.cos(axis) * np.cos(back), np.sin(axis) * np.cos(back), np.sin(back)])
    return {
        "age": int(rng.integers(18, 90)),
        "sex": "Male" if rng.random() < 0.5 else "Female",
        "dirs": {
            "P": _direction(rng, [0.55, 0.8, 0.15], 15),
            "Q": _direction(rng, [-0.6, 0.1, 0.7], 20),
            "R": r_dir,
            "S": _direction(rng, [-0.35, -0.45, -0.75], 20),
            "T": _unit(r_dir + rng.normal(0, 0.3, 3) + np.array([0, 0, 0.4])),
            "R2": _direction(rng, [-0.6, 0.0, 0.8], 10),
        },
        "amp": {
            w: a * float(rng.lognormal(0, 0.25))
            for w, a in {"P": 0.15, "Q": 0.12, "R": 1.3, "S": 0.35, "T": 0.35, "R2": 0.0}.items()
        },
        "width": {
            w: s * float(rng.uniform(0.8, 1.2))
            for w, s in {
                "P": 0.022,
                "Q": 0.008,
                "R": 0.010,
                "S": 0.010,
                "T": 0.045,
                "R2": 0.012,
            }.items()
        },
        "pr": float(rng.uniform(0.13, 0.19)),
        "qt": float(rng.uniform(0.36, 0.42)),  # at 60 bpm; Bazett-scaled per beat
        "precordial_deg": _PRECORDIAL_DEG + rng.normal(0, 6, 6),
        "precordial_tilt": rng.normal(0, 0.1, 6),
        "noise_mv": float(rng.uniform(0.008, 0.02)),
    }


def _lead_matrix(precordial_deg: np.ndarray, tilt: np.ndarray) -> np.ndarray:
    """(8, 3): lead vectors of I, II and V1..V6 (the other limb leads are derived)."""
    ang = np.deg2rad(precordial_deg)
    chest = CHEST_GAIN * np.stack([np.cos(ang), tilt, np.sin(ang)], axis=1)
    return np.vstack([[1.0, 0.0, 0.0], [0.5, np.sqrt(3) / 2, 0.0], chest])


def _beat_times(rng, rate: float, seconds: float, irregular: bool) -> tuple[np.ndarray, np.ndarray]:
    """R-peak times covering [-1.5 s, seconds + 1.5 s] and each beat's preceding RR interval."""
    rr0 = 60.0 / rate
    n = int((seconds + 3.0) / (rr0 * 0.6)) + 4
    if irregular:  # AF: independent, widely spread intervals
        rr = np.clip(rng.normal(rr0, 0.22 * rr0, n), 0.3, 2.0)
    else:  # sinus: respiratory modulation plus small jitter
        k = np.arange(n)
        rr = rr0 * (
            1
            + 0.04 * np.sin(2 * np.pi * k / rng.uniform(3.5, 5.5) + rng.uniform(0, 6.3))
            + rng.normal(0, 0.01, n)
        )
    times = -1.5 + rng.uniform(0, rr0) + np.concatenate([[0.0], np.cumsum(rr[1:])])
    keep = times < seconds + 1.5
    return times[keep], rr[keep]


def _wave_course(centers: np.ndarray, sigma: float, amp: float, n: int, fs: int) -> np.ndarray:
    """Sum over beats of amp * Gaussian(center, sigma) sampled on n points, evaluated only within
    +-5 sigma of each center (the full (beats, T) grid would cost 50x more)."""
    if amp == 0.0:
        return np.zeros(n)
    half = int(np.ceil(5 * sigma * fs))
    idx = np.rint(centers * fs).astype(np.int64)[:, None] + np.arange(-half, half + 1)[None, :]
    vals = amp * np.exp(-0.5 * ((idx / fs - centers[:, None]) / sigma) ** 2)
    ok = (idx >= 0) & (idx < n)
    return np.bincount(idx[ok], weights=vals[ok], minlength=n)


def synth_record(
    patient: dict,
    rng: np.random.Generator,
    abnormality: str | None,
    seconds: float = 10.0,
    fs: int = 500,
) -> tuple[np.ndarray, float]:
    """One record: (12, seconds*fs) float32 mV in LEADS order, and its mean heart rate (bpm)."""
    kind = abnormality or "normal"
    lo, hi = RATE_RANGES.get(kind, RATE_RANGES["normal"])
    rate = float(rng.uniform(lo, hi))
    af = kind == "AF"
    r_t, rr = _beat_times(rng, rate, seconds, irregular=af)

    amp = {w: a * float(rng.lognormal(0, 0.05)) for w, a in patient["amp"].items()}
    width = dict(patient["width"])
    dirs = {w: _direction(rng, d, 3) for w, d in patient["dirs"].items()}
    pr = patient["pr"] + rng.normal(0, 0.005)
    if kind == "IAVB":
        pr = float(rng.uniform(0.26, 0.34))
    if af:
        amp["P"] = 0.0
    if kind == "TInv":
        dirs["T"] = -dirs["T"]
    if kind == "CRBBB":
        amp["R2"] = amp["R"] * float(rng.uniform(0.7, 1.0))
        width["S"] = 0.03
        dirs["S"] = _unit(np.array([-0.9, 0.0, 0.1]) + rng.normal(0, 0.05, 3))
        dirs["T"] = _unit(-dirs["R2"] + rng.normal(0, 0.1, 3))
    if kind == "CLBBB":  # no septal q; broad, notched leftward-posterior R (R2 = the notch)
        width["R"] = width["R2"] = 0.022
        width["S"] = 0.02
        amp["Q"] = 0.0
        amp["S"] *= 0.5
        dirs["R"] = _unit(np.array([0.8, 0.1, -0.6]) + rng.normal(0, 0.05, 3))
        dirs["R2"] = dirs["R"]
        amp["R2"] = amp["R"] * float(rng.uniform(0.7, 0.9))
        dirs["T"] = -dirs["R"]
        amp["T"] *= 1.5

    qt = patient["qt"] * np.sqrt(np.clip(rr, 0.3, 2.0))  # Bazett
    offsets = {"P": -pr, "Q": -0.028, "R": 0.0, "S": 0.028, "R2": 0.065}
    if kind == "CRBBB":  # terminal conduction delay: late R' and slurred S, QRS ~130 ms
        offsets["S"] = 0.05
    if kind == "CLBBB":  # notch 60 ms after R, QRS ~130 ms
        offsets["R2"], offsets["S"] = 0.06, 0.075
    centers = np.stack([r_t + offsets[w] if w != "T" else r_t + qt - 0.12 for w in WAVES], axis=1)

    n = round(seconds * fs)
    t = np.arange(n, dtype=np.float64) / fs
    sig_w = np.array([width[w] for w in WAVES])
    amp_w = np.array([amp[w] for w in WAVES])
    courses = np.stack(
        [_wave_course(centers[:, j], sig_w[j], amp_w[j], n, fs) for j in range(len(WAVES))]
    )  # (waves, T)
    dipole = np.stack([dirs[w] for w in WAVES], axis=1) @ courses  # (3, T)
    if af:  # fibrillatory waves along the atrial axis
        f = rng.uniform(4.5, 7.5)
        fw = 0.05 * np.sin(
            2 * np.pi * f * t + 0.5 * np.sin(2 * np.pi * 0.3 * t) + rng.uniform(0, 6.3)
        )
        dipole += np.outer(patient["dirs"]["P"], fw)

    deg = patient["precordial_deg"] + rng.normal(0, 2, 6)
    eight = _lead_matrix(deg, patient["precordial_tilt"]) @ dipole  # I, II, V1..V6
    wander = rng.uniform(0.03, 0.12, (8, 1)) * np.sin(
        2 * np.pi * rng.uniform(0.1, 0.4) * t[None, :] + rng.uniform(0, 6.3, (8, 1))
    )
    eight += wander + _band_limited_noise(rng, patient["noise_mv"], eight.shape)
    lead_i, lead_ii = eight[0], eight[1]
    limb = np.stack(
        [
            lead_i,
            lead_ii,
            lead_ii - lead_i,
            -(lead_i + lead_ii) / 2,
            lead_i - lead_ii / 2,
            lead_ii - lead_i / 2,
        ]
    )
    x = np.vstack([limb, eight[2:]]).astype(np.float32)
    beats_in = (r_t >= 0) & (r_t < seconds)
    mean_rr = float(np.mean(rr[beats_in])) if beats_in.sum() > 1 else 60.0 / rate
    return x, 60.0 / mean_rr


def _band_limited_noise(rng: np.random.Generator, rms_mv: float, shape) -> np.ndarray:
    """Gaussian noise of the given RMS, low-passed by a [1, 2, 1]/4 kernel (cut-off ~fs/4, as
    the acquisition filters of real recorders): white noise up to Nyquist is not what ECG
    files hold, and it would make the stored segments incompressible."""
    white = rng.normal(0, rms_mv / np.sqrt(0.375), (shape[0], shape[1] + 2))
    return 0.25 * white[:, :-2] + 0.5 * white[:, 1:-1] + 0.25 * white[:, 2:]


def _checksum(v: np.ndarray) -> np.ndarray:
    return ((v.astype(np.int64).sum(axis=1) + 32768) % 65536) - 32768


def write_record(
    base: Path,
    val: np.ndarray,
    fs: int,
    age,
    sex: str,
    codes,
    patient: str | None,
    leads: tuple[str, ...] = LEADS,
) -> None:
    """Write ``base.hea`` + ``base.mat`` (MATLAB v4, key ``val``, int16), challenge dialect;
    row ``k`` of ``val`` is lead ``leads[k]`` (fewer than 12 for a reduced-lead record)."""
    if len(leads) != val.shape[0]:
        raise ValueError(f"{base.name}: {val.shape[0]} signal rows but {len(leads)} lead names")
    name = base.name
    scipy.io.savemat(base.with_suffix(".mat"), {"val": val}, format="4")
    lines = [f"{name} {val.shape[0]} {fs} {val.shape[1]}"]
    for lead, first, chk in zip(leads, val[:, 0], _checksum(val), strict=True):
        lines.append(f"{name}.mat 16+24 {GAIN}/mV 16 0 {int(first)} {int(chk)} 0 {lead}")
    lines += [
        f"#Age: {age}",
        f"#Sex: {sex}",
        f"#Dx: {','.join(codes)}",
        "#Rx: Unknown",
        "#Hx: Unknown",
        "#Sx: Unknown",
    ]
    if patient is not None:
        lines.append(f"#Patient: {patient}")
    base.with_suffix(".hea").write_text("\n".join(lines) + "\n")


def write_cohort(
    out: str | Path,
    patients: int,
    records_per_patient: int,
    seconds: float = 10,
    seed: int = 0,
    label_fraction: float = 0.5,
    fs: int = 500,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Write ``patients * records_per_patient`` synthetic records under ``out`` and return the
    manifest (also saved as ``out/synth_manifest.json``): ``{"root", "n_patients", "n_records",
    "seconds", "fs", "seed", "label_fraction", "records": [{"path", "patient", "codes",
    "abnormality", "heart_rate"}]}``. Refuses a non-empty ``out`` (never overwrites a cohort).
    ``progress(done, total)`` is called after each record."""
    out = Path(out)
    if patients < 1 or records_per_patient < 1:
        raise ValueError("patients and records_per_patient must be >= 1")
    if not 0.0 <= label_fraction <= 1.0:
        raise ValueError(f"label_fraction must be in [0, 1], got {label_fraction}")
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: output directory is not empty; choose a new one")
    out.mkdir(parents=True, exist_ok=True)
    kinds = list(ABNORMALITIES)
    total = patients * records_per_patient
    records = []
    for p in range(patients):
        patient = make_patient(np.random.default_rng([seed, p]))
        pid = f"SYN{p + 1:05d}"
        for k in range(records_per_patient):
            idx = p * records_per_patient + k
            rng = np.random.default_rng([seed, p, k + 1])
            kind = kinds[int(rng.integers(len(kinds)))] if rng.random() < label_fraction else None
            x, hr = synth_record(patient, rng, kind, seconds=seconds, fs=fs)
            val = np.clip(np.rint(x * GAIN), -32768, 32767).astype(np.int16)
            folder = out / f"g{idx // RECORDS_PER_DIR + 1}"
            folder.mkdir(exist_ok=True)
            name = f"S{idx + 1:06d}"
            codes = ABNORMALITIES[kind] if kind else NORMAL_CODES
            write_record(folder / name, val, fs, patient["age"], patient["sex"], codes, pid)
            records.append(
                {
                    "path": f"{folder.name}/{name}",
                    "patient": pid,
                    "codes": list(codes),
                    "abnormality": kind or "NSR",
                    "heart_rate": round(hr, 2),
                }
            )
            if progress is not None:
                progress(idx + 1, total)
    manifest = {
        "root": str(out),
        "n_patients": patients,
        "n_records": total,
        "seconds": seconds,
        "fs": fs,
        "seed": seed,
        "label_fraction": label_fraction,
        "records": records,
    }
    (out / "synth_manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def summarize(manifest: dict) -> str:
    """One-paragraph summary of a cohort manifest for the CLI: counts per abnormality."""
    counts: dict[str, int] = {}
    for r in manifest["records"]:
        counts[r["abnormality"]] = counts.get(r["abnormality"], 0) + 1
    parts = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    return (
        f"wrote {manifest['n_records']} records of {manifest['n_patients']} patients "
        f"({manifest['seconds']} s at {manifest['fs']} Hz) to {manifest['root']}: {parts}"
    )
