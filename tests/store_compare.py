"""Helpers shared by the ingest tests: compare two stores (different secrets allowed)."""

import numpy as np
import pandas as pd

from ecgplat.store import open_store


def assert_same_store(path_a, path_b, same_secret: bool = False) -> None:
    """Equal segments, segment index, record table and rejects. Without ``same_secret`` the
    patient keys are compared as a partition (same grouping of records)."""
    a, b = open_store(path_a), open_store(path_b)
    assert (a.n_records, a.n_segments, a.n_rejects) == (b.n_records, b.n_segments, b.n_rejects)
    np.testing.assert_array_equal(
        a.read_segments_raw(np.arange(a.n_segments)), b.read_segments_raw(np.arange(b.n_segments))
    )
    np.testing.assert_array_equal(a.segment_record_index, b.segment_record_index)
    np.testing.assert_array_equal(a.segment_number, b.segment_number)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.lead_masks, b.lead_masks)
    keyed = ("patient_key", "path_hash")  # depend on the per-store secret
    cols = [c for c in a.records.columns if c not in keyed + ("split", "ident_split")]
    pd.testing.assert_frame_equal(a.records[cols], b.records[cols])
    if same_secret:
        for c in keyed:
            assert list(a.records[c]) == list(b.records[c])
    else:
        assert (
            pd.factorize(a.records["patient_key"])[0].tolist()
            == pd.factorize(b.records["patient_key"])[0].tolist()
        )
    rej = ["source", "path", "reason"]
    pd.testing.assert_frame_equal(a.rejects[rej], b.rejects[rej])
