"""The Dask ingest pipeline: a real LocalCluster, idempotent re-runs, appending a second corpus."""

import numpy as np
import pytest
from store_compare import assert_same_store

from ecgplat.store import open_store
from ingestion.pipeline import ingest


def test_local_cluster_two_workers_equals_in_process(synth_cohort, synth_store, tmp_path):
    store = tmp_path / "store"
    summary = ingest(
        "cinc2021", synth_cohort, store, workers=2, batch_size=5, progress=False, max_in_flight=3
    )
    assert summary["records"] == 72 and summary["segments"] == 144
    assert summary["patients"] == 24 and summary["rejected"] == {}
    assert summary["bytes_read"] > 72 * 2 * 12 * 5000  # int16 .mat files at least
    assert_same_store(store, synth_store)


def test_rerun_is_idempotent_and_resumes_a_limited_run(synth_cohort, synth_store, tmp_path):
    store = tmp_path / "store"
    first = ingest(
        "cinc2021", synth_cohort, store, workers=0, batch_size=7, limit=30, progress=False
    )
    assert first["records"] == 30
    second = ingest("cinc2021", synth_cohort, store, workers=0, batch_size=11, progress=False)
    assert (second["records"], second["skipped"]) == (42, 30)
    third = ingest("cinc2021", synth_cohort, store, workers=0, progress=False)
    assert (third["records"], third["skipped"], third["store_records"]) == (0, 72, 72)
    assert_same_store(store, synth_store)


def test_append_second_corpus(samples_dir, tmp_path):
    store = tmp_path / "store"
    a = ingest("cinc2021", samples_dir / "cinc2021", store, workers=0, progress=False)
    before = open_store(store)
    segs_before = before.read_segments_raw(np.arange(before.n_segments))
    b = ingest("ptbxl", samples_dir / "ptbxl", store, workers=0, progress=False)
    after = open_store(store)
    assert after.n_records == a["records"] + b["records"] and b["records"] > 0
    assert set(after.records["source"]) == {"cinc2021", "ptbxl"}
    # the first corpus is untouched, the second starts right after it
    np.testing.assert_array_equal(
        after.read_segments_raw(np.arange(before.n_segments)), segs_before
    )
    ptb = after.select(source="ptbxl")
    assert ptb.min() == before.n_records
    assert after.records["seg_start"][ptb.min()] == before.n_segments
    assert (after.records["strat_fold"][ptb] >= 1).all()
    assert (after.records["strat_fold"][after.select(source="cinc2021")] == -1).all()
    # PTB-XL has patient ids: records of one patient share a key
    assert after.records["patient_key"][ptb].nunique() < len(ptb)
    # the store is internally consistent: seg ranges tile the segment array
    starts, counts = after.records["seg_start"].to_numpy(), after.records["seg_count"].to_numpy()
    assert starts.tolist() == np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
    assert (
        after.segment_record_index.tolist()
        == np.repeat(np.arange(after.n_records), counts).tolist()
    )


def test_unknown_corpus_and_missing_source(tmp_path):
    with pytest.raises(ValueError, match="unknown corpus"):
        ingest("nope", tmp_path, tmp_path / "s", workers=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ingest("cinc2021", tmp_path / "missing", tmp_path / "s", workers=0)
