"""The store's content is a function of its inputs: ingesting every bundled sample corpus gives the
content hash recorded in ``fixtures/store_content.json``.

The hash was recorded before the store and the readers moved into their packages (issue 18), so
it guards refactors against silently changing what lands in a store. Patient keys and path
hashes depend on the store's random secret, so they enter as a partition (which records share a
key), not as values. A deliberate format change re-records the hash with
``python tests/test_store_content.py --record``.

Re-recorded for issue 21: the record table gained the ``filter`` column ("" for every record:
no ``--filter``) and the hash now also covers ``derived_masks`` (all False: no vendor record);
with the ``filter`` column left out, the store hashed to the previous value unchanged.
"""

import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from ecgplat.store import open_store
from ingestion.pipeline import ingest
from ingestion.splits import split_store

FIXTURE = Path(__file__).parent / "fixtures" / "store_content.json"
SAMPLES = Path(__file__).parents[1] / "data" / "samples"
# (corpus reader, sample folder): every bundled corpus of a voltage reader, one store.
CORPORA = [
    ("cinc2021", "cinc2021"),
    ("ptbxl", "ptbxl"),
    ("cpsc2021", "cpsc2021"),
    ("ludb", "ludb"),
    ("code15", "code15"),
    ("wfdb", "wfdb_misc"),
]
SECRET_BOUND = ("patient_key", "path_hash")
PSEUDONYM = re.compile(r"p-[0-9a-f]{16}")


def _feed(h, name: str, data) -> None:
    h.update(name.encode() + b"\0")
    if isinstance(data, np.ndarray):
        a = np.ascontiguousarray(data)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    else:
        h.update(str(data).encode())


def content_hash(path: Path) -> dict:
    """sha256 of every array and column of a store, and the counts, as a dict."""
    s = open_store(path)
    h = hashlib.sha256()
    _feed(h, "segments", s.read_segments_raw(np.arange(s.n_segments)))
    for name in ("segment_record_index", "segment_number", "labels", "lead_masks", "derived_masks"):
        _feed(h, name, np.asarray(getattr(s, name)))
    records = s.records
    codes, keys = pd.factorize(records["patient_key"])
    order = {key: f"patient{i}" for i, key in enumerate(keys)}

    def unkeyed(text: str) -> str:  # pseudonyms inside keys and paths (CPSC 2021 names them)
        return PSEUDONYM.sub(lambda m: order.get(m.group(), "unknown-patient"), text)

    cols = [c for c in records.columns if c not in SECRET_BOUND]
    _feed(h, "records", unkeyed(records[cols].to_csv(index=True, float_format="%.9g")))
    _feed(h, "patients", codes)
    _feed(h, "path_hash", pd.factorize(records["path_hash"])[0])
    _feed(h, "rejects", unkeyed(s.rejects[["source", "path", "reason"]].to_csv(index=False)))
    return {
        "records": int(s.n_records),
        "segments": int(s.n_segments),
        "rejects": int(s.n_rejects),
        "sha256": h.hexdigest(),
    }


def build_store(root: Path) -> Path:
    store = root / "store"
    for corpus, folder in CORPORA:
        ingest(corpus, SAMPLES / folder, store, workers=0, progress=False)
    split_store(store, seed=0, ident=True)
    return store


def test_bundled_samples_give_the_recorded_store(tmp_path):
    assert content_hash(build_store(tmp_path)) == json.loads(FIXTURE.read_text())


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        FIXTURE.write_text(json.dumps(content_hash(build_store(Path(d))), indent=1) + "\n")
    print(FIXTURE.read_text())
