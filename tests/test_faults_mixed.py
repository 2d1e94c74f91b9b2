"""The fault bench in small: a mixed corpus with every hostile-file kind, ingested by the CLI on a
one-worker LocalCluster; all bad rejected, all good kept, memory bounded, no raw id written."""

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("faults_bench", ROOT / "bench" / "faults.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_mixed_corpus_through_the_dask_cli(tmp_path):
    faults = _bench()
    r = faults.run_bench(tmp_path, n_records=100, workers=1, max_rss_mb=1024)
    assert r["checks"] == dict.fromkeys(r["checks"], True), json.dumps(r, indent=1)[:3000]
    assert r["wrong"] == [] and r["leaks_by_output"] == {}
    # every fault kind was written once and rejected for its own reason, not a generic one
    kinds = {k.split(": ", 1)[1] for k in r["reasons_by_fault"]}
    assert len(kinds) == faults.N_KINDS == r["bad_total"]
    reasons = [reason for by in r["reasons_by_fault"].values() for reason in by]
    assert not [x for x in reasons if "unexpected" in x or "zero-length" in x or x == "STORED"]
    assert r["reasons_by_fault"]["cinc2021: fs=0.25 memory bomb"] == {"sampling rate * Hz is": 1}
    # the grep ran over real bytes, and the raw ids are really in the corpus it read
    assert r["bytes_grepped"] > 1_000_000 and r["raw_ids"] >= 30
    assert r["store_records"] == r["good_total"] and r["store_rejects"] == r["bad_total"]


def test_the_grep_finds_a_planted_id(tmp_path):
    """The leak check is not blind: a raw id planted in a store file and in an output is found."""
    faults = _bench()
    (tmp_path / "a").write_bytes(b"\x00zarr\x01data_7310004_1")
    blobs = {"a": (tmp_path / "a").read_bytes(), "<stderr>": b"fine", "<stdout>": b"PAT-31000\n"}
    assert faults._leaks({"7310004", "PAT-31000", "HOSP-5000-ZZ"}, blobs) == {
        "a": 1,
        "<stdout>": 1,
    }
