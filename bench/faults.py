"""Fault bench: a mixed corpus with ~5 % hostile files of every kind, through the default Dask path.

Writes four corpora in a temporary folder (CinC 2021 .hea + .mat, generic WFDB .hea + .dat at
several rates and sample formats, CPSC 2021 ``data_<patient>_<record>`` names, PTB-XL csv + WFDB
records). Good records carry raw patient ids (``#Patient:`` comments, CPSC file names, PTB-XL
``patient_id``; some also in non-numeric age/sex fields) and unicode file names. About 5 % of the
records are broken, each kind of fault at least once: a header declaring fewer signals than the
``.dat`` interleaves, negative / NaN / infinite / zero rates, ``fs=0.25`` (the resampling memory
bomb), an unreadable gain on one lead and on all, mmHg-only channels, ``z`` units, a multi-segment
header, truncated ``.mat``/``.dat``, signal files named ``../..`` or by absolute path, symbolic
links out of SRC, PTB-XL rows pointing outside, raw ids in csv fields that must be integers, and
headers declaring 100,000,000 samples over a sparse ``.dat``/``.mat`` of the matching size.
A fifth folder, ingested with ``ingest auto``, holds the bundled hospital-format samples (their
identifying values count as raw ids) and one hostile vendor file of each kind
(``tests/hostile_files.py``: XML billion laughs, XML external entity, oversized base64, a DICOM
declaring a huge waveform, an SCP-ECG section past EOF, an EDF whose record count disagrees
with its size).

Each corpus is ingested by ``ecgplat ingest`` (its default LocalCluster, one worker per core,
unless ``--workers``) into one store, while psutil samples the RSS of the CLI process and all its
children (scheduler, nannies, workers). Prints one JSON object and exits non-zero unless

- every bad record is rejected (matched by its keyed path hash) and no good one is stored twice;
- every good record is stored and none rejected;
- the largest process stays under ``--max-rss-mb``;
- no raw id occurs in any byte written: every store file, the decoded records and rejects
  tables, the CLI's stdout and stderr (summaries, Dask logs) and ``ecgplat info``.

    python bench/faults.py [--records 400] [--out FILE] [--workdir DIR] [--workers N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the hostile-file writers are shared with tests

from hostile_files import (  # noqa: E402
    declare_samples,
    edit_header,
    write_cinc,
    write_ptbxl,
    write_wfdb,
)

from bench.common import TreeSampler, workdir, write_report  # noqa: E402

CORPORA = ("cinc2021", "wfdb", "cpsc2021", "ptbxl")
SHARE = {"cinc2021": 0.35, "wfdb": 0.25, "cpsc2021": 0.2, "ptbxl": 0.2}
WFDB_RATES = [(250, "16"), (360, "212"), (500, "16"), (1000, "24"), (500, "80")]


@dataclass
class Corpus:
    """One corpus folder: the records that must be stored, those that must be rejected (with
    their fault kind) and the raw ids written into it."""

    name: str
    src: Path
    good: list[str] = field(default_factory=list)
    bad: dict[str, str] = field(default_factory=dict)
    raw_ids: set[str] = field(default_factory=set)
    sources: dict[str, str] = field(default_factory=dict)  # an auto ingest: each file's reader


# ---- faults: (corpus, kind) -> writer; the first occurrence of each kind is listed first ------


def _rate(value):
    return lambda base: edit_header(base, lambda ls: [_set_rate(ls[0], value), *ls[1:]])


def _set_rate(line: str, value) -> str:
    parts = line.split()
    parts[2] = str(value)
    return " ".join(parts)


def _every_signal_line(fn):
    return lambda base: edit_header(base, lambda ls: [ls[0], *map(_unless_comment(fn), ls[1:])])


def _unless_comment(fn):
    return lambda line: line if line.startswith("#") else fn(line)


def _first_signal_line(fn):
    return lambda base: edit_header(base, lambda ls: [ls[0], fn(ls[1]), *ls[2:]])


def _gain(line: str) -> str:
    parts = line.split()
    parts[2] = "abc/" + parts[2].split("/", 1)[1]
    return " ".join(parts)


def _units(unit: str):
    def fn(line: str) -> str:
        parts = line.split()
        parts[2] = parts[2].split("/", 1)[0] + "/" + unit
        return " ".join(parts)

    return fn


def _truncate(suffix: str):
    def fn(base: Path) -> None:
        f = base.with_name(base.name + suffix)
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    return fn


def _signal_file(target):
    """Point every signal line at ``target(base)`` (a path relative to the header or absolute)."""

    def fn(base: Path) -> None:
        name = target(base)
        edit_header(base, lambda ls: [ls[0], *(_set_file(ln, name) for ln in ls[1:])])

    return fn


def _set_file(line: str, name: str) -> str:
    return line if line.startswith("#") else " ".join([name, *line.split()[1:]])


def _symlink_out(suffix: str):
    def fn(base: Path) -> None:
        f = base.with_name(base.name + suffix)
        f.unlink()
        f.symlink_to(_outside(base) / f"secret{suffix}")

    return fn


def _outside(base: Path) -> Path:
    for parent in base.parents:
        if (parent / "outside").is_dir():
            return parent / "outside"
    raise FileNotFoundError("no outside folder above the corpus")


def _declare_fewer_signals(base: Path) -> None:
    edit_header(base, lambda ls: [_set_count(ls[0], -1), *ls[1:-1]])


def _set_count(line: str, delta: int) -> str:
    parts = line.split()
    parts[1] = str(int(parts[1]) + delta)
    return " ".join(parts)


def _multi_segment(base: Path) -> None:
    """A multi-segment header (``name/2``) whose segments are the record's own single-segment
    copy, kept beside it under another name (a good record of its own)."""
    seg = base.with_name(base.name + "_seg")
    for suffix in (".hea", ".dat"):
        base.with_name(base.name + suffix).rename(seg.with_name(seg.name + suffix))
    text = seg.with_name(seg.name + ".hea").read_text(encoding="utf-8")
    seg.with_name(seg.name + ".hea").write_text(
        text.replace(f"{base.name}.dat", f"{seg.name}.dat").replace(base.name, seg.name, 1),
        encoding="utf-8",
    )
    n = text.split()[3]
    base.with_name(base.name + ".hea").write_text(
        f"{base.name}/2 {text.split()[1]} {text.split()[2]} {2 * int(n)}\n"
        f"{seg.name} {n}\n{seg.name} {n}\n",
        encoding="utf-8",
    )


FAULTS = [
    ("wfdb", "signal count below the .dat interleave", _declare_fewer_signals),
    ("cinc2021", "negative sampling rate", _rate(-500)),
    ("wfdb", "NaN sampling rate", _rate("nan")),
    ("cpsc2021", "zero sampling rate", _rate(0)),
    ("cinc2021", "fs=0.25 memory bomb", _rate(0.25)),
    ("wfdb", "non-numeric gain on one lead", _first_signal_line(_gain)),
    ("cinc2021", "non-numeric gain on all leads", _every_signal_line(_gain)),
    ("wfdb", "mmHg-only channels", _every_signal_line(_units("mmHg"))),
    ("cinc2021", "z units", _every_signal_line(_units("z"))),
    ("wfdb", "multi-segment header", _multi_segment),
    ("cinc2021", "truncated .mat", _truncate(".mat")),
    ("cpsc2021", "truncated .dat", _truncate(".dat")),
    ("cinc2021", "signal file ../../outside", _signal_file(lambda b: "../../outside/secret.mat")),
    ("wfdb", "absolute signal file", _signal_file(lambda b: str(_outside(b) / "secret.dat"))),
    ("cinc2021", "symlinked .mat outside SRC", _symlink_out(".mat")),
    ("ptbxl", "non-integer sex holding a raw id", "sex"),
    ("ptbxl", "row pointing outside SRC", "../outside/x"),
    ("ptbxl", "row with an absolute path", "ABS"),
    ("ptbxl", "non-integer strat_fold holding a raw id", "strat_fold"),
    ("wfdb", "infinite sampling rate", _rate("inf")),
    ("cpsc2021", "symlinked .dat outside SRC", _symlink_out(".dat")),
    ("cpsc2021", "signal count below the .dat interleave", _declare_fewer_signals),
    ("ptbxl", "truncated .dat", _truncate(".dat")),
    ("cinc2021", "absolute signal file", _signal_file(lambda b: str(_outside(b) / "secret.mat"))),
    ("wfdb", "non-numeric gain on all leads", _every_signal_line(_gain)),
    ("cinc2021", "non-numeric gain on one lead", _first_signal_line(_gain)),
    ("wfdb", "z units", _every_signal_line(_units("z"))),
    ("cinc2021", "mmHg-only channels", _every_signal_line(_units("mmHg"))),
    ("wfdb", "truncated .dat", _truncate(".dat")),
    ("wfdb", "signal file ../../outside", _signal_file(lambda b: "../../outside/secret.dat")),
    ("wfdb", "symlinked .dat outside SRC", _symlink_out(".dat")),
    ("cpsc2021", "negative sampling rate", _rate(-200)),
    ("ptbxl", "non-integer ecg_id holding a raw id", "ecg_id"),
    ("ptbxl", "signal count below the .dat interleave", _declare_fewer_signals),
    ("wfdb", "100,000,000 samples declared, sparse .dat", lambda b: declare_samples(b, 10**8)),
    ("cinc2021", "100,000,000 samples declared, sparse .mat", lambda b: declare_samples(b, 10**8)),
]
# hostile vendor files, ingested with `ingest auto` next to good vendor samples (the "hospital"
# corpus): (file name, the reader its content claims, kind, writer from tests/hostile_files.py)
VENDOR_FAULTS = [
    ("laughs.xml", "muse", "XML billion laughs", "write_billion_laughs"),
    ("xxe.xml", "philips", "XML external entity", "write_xxe"),
    ("big.xml", "muse", "oversized base64 (> 64 MB XML)", "write_oversized_base64"),
    ("huge.dcm", "dicom", "DICOM declaring a huge waveform", "write_dicom_huge_waveform"),
    ("eof.scp", "scp", "SCP-ECG section length past EOF", "write_scp_section_past_eof"),
    (
        "count.edf",
        "edf",
        "EDF record count disagreeing with its size",
        "write_edf_wrong_record_count",
    ),
]
N_KINDS = len({kind for _, kind, _ in FAULTS}) + len(VENDOR_FAULTS)


def plan_faults(n_records: int, bad_fraction: float) -> list[tuple[str, str, object]]:
    """The faults to write: ``bad_fraction`` of ``n_records`` (at least one of each kind),
    cycling through ``FAULTS``."""
    first = [f for i, f in enumerate(FAULTS) if f[1] not in {g[1] for g in FAULTS[:i]}]
    n_bad = max(len(first), round(bad_fraction * n_records))
    rest = [f for f in FAULTS if f not in first]
    cycle = first + rest
    return [cycle[i % len(cycle)] for i in range(n_bad)]


# ---- the corpora ------------------------------------------------------------------------------


def _cinc(root: Path, n_good: int, faults) -> Corpus:
    c = Corpus("cinc2021", root / "cinc" / "src")
    for i in range(n_good):
        raw = f"PAT-{31000 + i // 2}"
        if i % 10 == 3:  # unicode name
            name, folder = f"Élan_ß{i:04d}", "g2"
        elif i % 5 == 0:  # the raw id in the file name (redacted in record_id and path)
            name, folder = f"{raw}_{i % 2}", "g1"
        else:
            name, folder = f"E{i:05d}", "g1"
        base = write_cinc(c.src / folder, name, seconds=10, patient=raw)
        if i % 7 == 1:  # a raw id in fields parsed as numbers / spellings: kept as NaN / ""
            edit_header(base, lambda ls, raw=raw: [*ls, f"#Age: {raw}", f"#Sex: {raw}"])
        c.good.append(f"{folder}/{name}")
        c.raw_ids.add(raw)
    for j, (kind, fault) in enumerate(faults):
        raw = f"PAT-{39000 + j}"
        base = write_cinc(c.src / "g1", f"{raw}_bad", seconds=10, patient=raw)
        fault(base)
        c.bad[f"g1/{raw}_bad"] = kind
        c.raw_ids.add(raw)
    return c


def _wfdb(root: Path, n_good: int, faults) -> Corpus:
    c = Corpus("wfdb", root / "wfdb" / "src")
    for i in range(n_good):
        fs, fmt = WFDB_RATES[i % len(WFDB_RATES)]
        name = f"électro_{i:04d}" if i % 10 == 4 else f"w{i:05d}"
        write_wfdb(c.src / f"r{fs}", name, n_sig=12, seconds=10, fs=fs, fmt=fmt, seed=i)
        c.good.append(f"r{fs}/{name}")
    for j, (kind, fault) in enumerate(faults):
        name = f"bad{j:03d}"
        base = write_wfdb(c.src / "bad", name, n_sig=12, seconds=10, fs=500, seed=j)
        fault(base)
        c.bad[f"bad/{name}"] = kind
        if kind == "multi-segment header":
            c.good.append(f"bad/{name}_seg")
    return c


def _cpsc(root: Path, n_good: int, faults) -> Corpus:
    c = Corpus("cpsc2021", root / "cpsc" / "src")
    for i in range(n_good):
        patient = 7310000 + i // 3
        folder = "élan" if i % 10 == 5 else "training"
        name = f"data_{patient}_{i % 3}"
        write_wfdb(c.src / folder, name, n_sig=2, seconds=10, fs=200, names=["I", "II"], seed=i)
        c.good.append(f"{folder}/{name}")
        c.raw_ids.add(str(patient))
    for j, (kind, fault) in enumerate(faults):
        patient = 7390000 + j
        name = f"data_{patient}_9"
        base = write_wfdb(c.src / "training", name, n_sig=2, fs=200, names=["I", "II"], seed=j)
        fault(base)
        c.bad[f"training/{name}"] = kind
        c.raw_ids.add(str(patient))
    return c


def _ptbxl(root: Path, n_good: int, faults) -> Corpus:
    c = Corpus("ptbxl", root / "ptbxl" / "src")
    rows, edits = [], []
    for i in range(n_good):
        name = f"ünï{i:05d}_hr" if i % 10 == 6 else f"{i:05d}_hr"
        # hospital-style string ids, and PTB-XL's own style: a number written as a float
        raw = f"HOSP-{5000 + i // 2}-ZZ" if i % 4 < 2 else str(6100000 + i // 2)
        pid = raw if i % 4 < 2 else float(raw)
        row = {"filename_hr": f"records500/{i // 100:05d}/{name}", "patient_id": pid}
        if i % 9 == 2:  # a raw id in the age column: read as NaN, the record is kept
            row["age"] = raw
        rows.append(row)
        c.good.append(row["filename_hr"])
        c.raw_ids.add(raw)
    for j, (kind, fault) in enumerate(faults):
        raw = f"HOSP-{9000 + j}-QQ"
        row = {"filename_hr": f"records500/bad/{j:05d}_hr", "patient_id": raw}
        if fault in ("sex", "strat_fold", "ecg_id"):
            row[fault] = raw
        elif fault == "../outside/x":
            row.update(filename_hr=f"../outside/x{j}", _no_file=True)
        elif fault == "ABS":
            row.update(filename_hr=str(root / "outside" / f"x{j}"), _no_file=True)
        else:
            edits.append((row["filename_hr"], fault))
        rows.append(row)
        c.bad[row["filename_hr"]] = kind
        c.raw_ids.add(raw)
    write_ptbxl(c.src, rows)
    for rel, fault in edits:
        fault(c.src / rel)
    return c


def _hospital(root: Path) -> Corpus:
    """The bundled vendor samples that read (good; their identifying values are the raw ids)
    and one hostile vendor file of each kind (bad), in one folder for `ingest auto`."""
    import shutil

    import hostile_files
    from hospital_samples import identifying_values, sample_files

    c = Corpus("auto", root / "hospital" / "src")
    c.src.mkdir(parents=True)
    samples = [(r, p) for r, p in sample_files(restricted=False) if p.stat().st_size > 4096]
    for reader, path in samples:  # (the minimal 13-sample aECG is too short: left out)
        shutil.copyfile(path, c.src / path.name)
        c.good.append(path.name)
        c.sources[path.name] = reader
        c.raw_ids |= identifying_values(path)
    bundled = {r: p for r, p in samples}
    for name, reader, kind, writer in VENDOR_FAULTS:
        args = (bundled[reader],) if reader in ("dicom", "scp") else ()
        getattr(hostile_files, writer)(c.src / name, *args)
        c.bad[name], c.sources[name] = kind, reader
    return c


def build_corpus(root: Path, n_records: int, bad_fraction: float = 0.05) -> list[Corpus]:
    """Write the four corpora under ``root`` (about ``n_records`` in all) and the files outside
    them that the hostile headers, rows and links point at."""
    root = Path(root)
    out = root / "outside"
    write_cinc(out, "secret")
    write_wfdb(out, "secret", n_sig=12)
    faults = plan_faults(n_records, bad_fraction)
    n_good = n_records - len(faults)
    writers = {"cinc2021": _cinc, "wfdb": _wfdb, "cpsc2021": _cpsc, "ptbxl": _ptbxl}
    corpora = [_hospital(root)]
    for name in CORPORA:
        mine = [(kind, fault) for corpus, kind, fault in faults if corpus == name]
        corpora.append(writers[name](root, max(3, round(SHARE[name] * n_good)), mine))
    return corpora


# ---- running and checking -----------------------------------------------------------------------


def _env() -> dict:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")


def run_cli(
    args: list[str], timeout: float = 1800
) -> tuple[subprocess.CompletedProcess, TreeSampler]:
    """``python -m ecgplat *args`` with its process tree's RSS sampled."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ecgplat", *args],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with TreeSampler(proc.pid) as rss:
        out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), rss


def _leaks(raw_ids: set[str], blobs: dict[str, bytes]) -> dict[str, int]:
    """Count of (raw id, blob) pairs where the id occurs, by blob name."""
    found: Counter = Counter()
    needles = [r.encode() for r in raw_ids]
    for name, data in blobs.items():
        for needle in needles:
            if needle in data:
                found[name] += 1
    return dict(found)


def _store_blobs(store: Path) -> dict[str, bytes]:
    from ecgplat.store import open_store

    blobs = {str(f.relative_to(store)): f.read_bytes() for f in store.rglob("*") if f.is_file()}
    s = open_store(store)
    blobs["<records table>"] = s.records.astype(str).to_csv().encode()
    blobs["<rejects table>"] = s.rejects.astype(str).to_csv().encode()
    return blobs


def check_store(store: Path, corpora: list[Corpus]) -> dict:
    """Bad rejected / good kept by keyed path hash, and the reasons per fault kind."""
    from ecgplat.store import SECRET_FILE, open_store, reason_kind
    from ecgplat.store.writer import path_hash

    secret = (store / SECRET_FILE).read_bytes()
    s = open_store(store)
    stored = Counter(s.records["path_hash"])
    rejected = dict(zip(s.rejects["path_hash"], s.rejects["reason"], strict=True))
    good_kept = bad_rejected = n_good = n_bad = 0
    wrong: list[str] = []
    by_kind: dict[str, Counter] = {}
    for c in corpora:
        for rel in c.good:
            h = path_hash(c.sources.get(rel, c.name), rel, secret)
            n_good += 1
            ok = stored[h] == 1 and h not in rejected
            good_kept += ok
            if not ok:
                wrong.append(f"good {c.name} record {len(wrong)}: " + rejected.get(h, "missing"))
        for rel, kind in c.bad.items():
            h = path_hash(c.sources.get(rel, c.name), rel, secret)
            n_bad += 1
            ok = h in rejected and stored[h] == 0
            bad_rejected += ok
            reason = reason_kind(rejected[h]) if h in rejected else "STORED"
            by_kind.setdefault(f"{c.name}: {kind}", Counter())[reason] += 1
            if not ok:
                wrong.append(f"bad {c.name} record ({kind}) was stored")
    return {
        "good_total": n_good,
        "good_kept": good_kept,
        "bad_total": n_bad,
        "bad_rejected": bad_rejected,
        "reasons_by_fault": {k: dict(v) for k, v in sorted(by_kind.items())},
        "reject_kinds": dict(Counter(reason_kind(r) for r in s.rejects["reason"]).most_common()),
        "store_records": int(s.n_records),
        "store_rejects": len(s.rejects),
        "wrong": wrong,
    }


def run_bench(workdir: Path, n_records: int, workers: int | None, max_rss_mb: float) -> dict:
    """Build the corpora under ``workdir``, ingest each by the CLI into one store, check."""
    t0 = time.perf_counter()
    corpora = build_corpus(workdir / "corpus", n_records)
    t_build = time.perf_counter() - t0
    store = workdir / "store"
    outputs: dict[str, bytes] = {}
    peak_total = peak_process = 0
    summaries = {}
    for c in corpora:
        args = ["ingest", c.name, str(c.src), "--store", str(store), "--no-progress", "--json"]
        args += ["--batch-size", "16"] + (["--workers", str(workers)] if workers else [])
        proc, rss = run_cli(args)
        if proc.returncode != 0:
            raise RuntimeError(f"ingest {c.name} failed ({proc.returncode}): {proc.stderr[-400:]}")
        outputs[f"<stdout {c.name}>"] = proc.stdout.encode()
        outputs[f"<stderr {c.name}>"] = proc.stderr.encode()
        peak_total, peak_process = max(peak_total, rss.peak), max(peak_process, rss.peak_process)
        summary = json.loads(proc.stdout)
        summaries[c.name] = {k: summary[k] for k in ("listed", "records", "seconds", "rejected")}
    info, _ = run_cli(["info", str(store)])
    outputs["<info stdout>"], outputs["<info stderr>"] = info.stdout.encode(), info.stderr.encode()
    result = check_store(store, corpora)
    raw_ids = set().union(*(c.raw_ids for c in corpora))
    leaks = _leaks(raw_ids, {**_store_blobs(store), **outputs})
    n = sum(len(c.good) + len(c.bad) for c in corpora)
    result.update(
        records=n,
        bad_fraction=round(result["bad_total"] / n, 4),
        fault_kinds=N_KINDS,
        raw_ids=len(raw_ids),
        bytes_grepped=sum(len(b) for b in {**_store_blobs(store), **outputs}.values()),
        leaks=sum(leaks.values()),
        leaks_by_output=leaks,
        peak_rss_mb=round(peak_total / 2**20, 1),
        peak_rss_process_mb=round(peak_process / 2**20, 1),
        max_rss_mb=max_rss_mb,
        workers=workers or os.cpu_count(),
        ingest=summaries,
        build_seconds=round(t_build, 2),
        seconds=round(time.perf_counter() - t0, 2),
    )
    result["checks"] = checks(result)
    return result


def checks(r: dict) -> dict[str, bool]:
    """The four properties the bench guards."""
    return {
        "bad_rejected_100pct": r["bad_rejected"] == r["bad_total"] > 0,
        "good_kept_100pct": r["good_kept"] == r["good_total"] > 0,
        "peak_rss_bounded": 0 < r["peak_rss_process_mb"] <= r["max_rss_mb"],
        "no_raw_id_leaked": r["leaks"] == 0 and r["raw_ids"] > 0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--records", type=int, default=400, help="records in all corpora")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--workdir", type=Path, help="folder for corpora and store (kept)")
    parser.add_argument("--workers", type=int, help="Dask workers (default: the CLI's)")
    parser.add_argument("--max-rss-mb", type=float, default=1024.0, help="per-process bound")
    args = parser.parse_args(argv)
    if args.records < 4 * N_KINDS:
        parser.error(f"--records must be at least {4 * N_KINDS}")
    with workdir(args.workdir, "faults-") as root:
        result = run_bench(root, args.records, args.workers, args.max_rss_mb)
    write_report(result, args.out, ensure_ascii=False)
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
