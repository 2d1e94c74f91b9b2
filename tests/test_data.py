"""The WebDataset streaming pipeline over real tar shards: pair/segment units, values,
rank/worker splitting, seeded order, resume, lead subsets, RLM, URL forms and bad shards."""

from __future__ import annotations

import io
import json
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from training.augment import RandomLeadMasking
from training.data import (
    BatchStream,
    ShardError,
    StreamSpec,
    group_id,
    record_units,
    shard_set,
    shard_urls,
    stream_from_config,
)
from training.run_config import load_config

torch.set_num_threads(1)
T = 2500


def _record(rng, index, n_segments, lead_mask=None):
    segs = rng.integers(-3000, 3000, size=(n_segments, 12, T), dtype=np.int16)
    mask = np.ones(12, dtype=int) if lead_mask is None else np.asarray(lead_mask, dtype=int)
    segs[:, mask == 0] = 0
    labels = np.zeros(26, dtype=int)
    labels[index % 26] = 1
    meta = {
        "record_key": f"synth/{index:05d}",
        "patient_key": f"p-{index // 2:014x}",
        "source": "synth",
        "split": "train",
        "labels": labels.tolist(),
        "lead_mask": mask.tolist(),
        "record_index": index,
    }
    return segs, meta


def write_shards(out: Path, per_shard: list[list[int]], split="train", seed=0, masks=None):
    """Shards as `ingestion.shards` writes them: per_shard[i] = segment counts of its records.
    Returns {record_index: int16 segments}."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    truth, entries, index = {}, [], 0
    for s, counts in enumerate(per_shard):
        name = f"{split}-{s:06d}.tar"
        with wds.TarWriter(str(out / name)) as sink:
            for n in counts:
                segs, meta = _record(rng, index, n, (masks or {}).get(index))
                buf = io.BytesIO()
                np.save(buf, segs)
                sink.write(
                    {
                        "__key__": f"r{index:08d}",
                        "seg.npy": buf.getvalue(),
                        "meta.json": json.dumps(meta).encode(),
                    }
                )
                truth[index] = segs
                index += 1
        entries.append({"file": name, "samples": len(counts), "segments": int(sum(counts))})
    info_path = out / "_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info[split] = {"shards": entries, "samples": index}
    info_path.write_text(json.dumps(info))
    return truth


def _spec(shards, **kw):
    kw.setdefault("batch_size", 2)
    return StreamSpec(shards=shards, **kw)


def _collect(stream):
    return [b for b in stream]


def test_record_units_pairs_and_segments():
    segs = np.arange(12 * 12 * 3, dtype=np.int16).reshape(12, 12, 3)
    meta = {}
    assert len(record_units(segs[:2], meta, "pairs")) == 1  # 10 s record
    pairs = record_units(segs, meta, "pairs")  # 60 s record
    assert [u.first for u in pairs] == [0, 2, 4, 6, 8, 10]
    assert np.array_equal(pairs[2].segments, segs[4:6])
    assert len(record_units(segs[:3], meta, "pairs")) == 1  # odd last segment dropped
    assert record_units(segs[:1], meta, "pairs") == []
    assert len(record_units(segs[:3], meta, "segments")) == 3


def test_pair_counts_and_values_from_shards(tmp_path):
    truth = write_shards(tmp_path, [[2, 12, 3], [1, 2]])
    ss = shard_set(tmp_path, "train")
    assert ss.samples == 5 and ss.segments == 20 and len(ss.urls) == 2
    batches = _collect(BatchStream(_spec(ss, mode="pairs", train=False, batch_size=3)))
    rec = torch.cat([b["record_index"] for b in batches]).numpy()
    counts = {r: int((rec == r).sum()) // 2 for r in np.unique(rec)}
    assert counts == {0: 1, 1: 6, 2: 1, 4: 1}  # record 3 (5 s) gives no pair
    for b in batches:
        assert b["source"].dtype == torch.float32 and b["source"].shape[1:] == (12, T)
        assert b["segment"].tolist() == [0, 1] * (len(b["segment"]) // 2)
        assert torch.equal(b["group"][0::2], b["group"][1::2])
        for p in range(len(b["segment"]) // 2):
            r = int(b["record_index"][2 * p])
            got = b["source"][2 * p : 2 * p + 2].numpy()
            # the pair is two consecutive segments (2k, 2k+1) of its record, int16 / 1000
            matches = [
                k
                for k in range(0, truth[r].shape[0] - 1, 2)
                if np.array_equal(got, truth[r][k : k + 2].astype(np.float32) / 1000)
            ]
            assert len(matches) == 1
    # one pair per record_index for the 60 s record: all six pairs, each once
    seg_batches = _collect(BatchStream(_spec(ss, mode="segments", train=False, batch_size=4)))
    for b in seg_batches:
        for i in range(len(b["record_index"])):
            r, k = int(b["record_index"][i]), int(b["segment_index"][i])
            assert np.array_equal(b["source"][i].numpy(), truth[r][k].astype(np.float32) / 1000)
    assert sum(len(b["record_index"]) for b in seg_batches) == 20


def test_segment_batch_contract(tmp_path):
    write_shards(tmp_path, [[2, 2, 2]], masks={1: [1] * 6 + [0] * 6})
    b = next(
        iter(
            BatchStream(
                _spec(shard_set(tmp_path, "train"), mode="segments", batch_size=6, train=False)
            )
        )
    )
    assert set(b) >= {"source", "lead_mask", "labels", "record_index", "patient_key"}
    assert b["labels"].dtype == torch.float32 and b["labels"].shape == (6, 26)
    assert b["lead_mask"].dtype == torch.bool and b["record_index"].dtype == torch.int64
    assert isinstance(b["patient_key"], list) and b["patient_key"][0].startswith("p-")
    rows = b["record_index"] == 1
    assert not b["lead_mask"][rows][:, 6:].any() and b["lead_mask"][~rows].all()
    assert b["labels"][b["record_index"] == 2, 2].eq(1).all()


def _units_of(batches):
    return [
        (int(r), tuple(b["source"][i, 0, :4].tolist()))
        for b in batches
        for i, r in enumerate(b["record_index"])
    ]


@pytest.mark.parametrize("per_shard", [[[2] * 5] * 4, [[2] * 20]], ids=["by_shard", "by_record"])
def test_two_ranks_disjoint_cover_and_same_length(tmp_path, per_shard):
    write_shards(tmp_path, per_shard)
    ss = shard_set(tmp_path, "train")
    streams = [BatchStream(_spec(ss, mode="pairs", seed=3), rank=r, world=2) for r in (0, 1)]
    assert len(streams[0]) == len(streams[1]) == 5  # 20 pairs / (2 ranks * 2)
    got = [_collect(s) for s in streams]
    assert len(got[0]) == len(got[1]) == 5
    recs = [set(torch.cat([b["record_index"] for b in g]).tolist()) for g in got]
    assert recs[0].isdisjoint(recs[1]) and recs[0] | recs[1] == set(range(20))
    # evaluation streams: disjoint and covering too, each record once
    ev = [
        torch.cat(
            [
                b["record_index"]
                for b in BatchStream(
                    _spec(ss, mode="segments", train=False, batch_size=3), rank=r, world=2
                )
            ]
        )
        for r in (0, 1)
    ]
    assert sorted(torch.cat(ev).tolist()) == sorted(list(range(20)) * 2)
    assert set(ev[0].tolist()).isdisjoint(set(ev[1].tolist()))


def test_unbalanced_shards_still_give_equal_batch_counts(tmp_path):
    write_shards(tmp_path, [[2] * 6, [2] * 6, [2] * 2])  # rank 0: 2 shards, rank 1: 1 shard
    ss = shard_set(tmp_path, "train")
    counts = [len(_collect(BatchStream(_spec(ss), rank=r, world=2))) for r in (0, 1)]
    assert counts == [3, 3]  # 14 pairs // (2 * 2)


def test_order_is_seeded(tmp_path):
    write_shards(tmp_path, [[2] * 8, [2] * 8])
    ss = shard_set(tmp_path, "train")

    def run(seed, epoch=0):
        return _units_of(_collect(BatchStream(_spec(ss, seed=seed, shuffle_buffer=8), epoch=epoch)))

    a = run(1)
    assert a == run(1)
    assert a != run(2) and sorted(a) == sorted(run(2))
    assert a != run(1, epoch=1)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_skips_to_the_same_batches(tmp_path, workers):
    write_shards(tmp_path, [[2] * 6, [2] * 6, [2] * 6, [2] * 6])
    spec = _spec(
        shard_set(tmp_path, "train"), batch_size=2, seed=5, rlm=RandomLeadMasking("random", 0.5)
    )
    full = BatchStream(spec, epoch=1, num_workers=workers)
    all_batches = _collect(full)
    assert len(all_batches) == 12 and full.batches_consumed == 12
    resumed = BatchStream(spec, epoch=1, num_workers=workers).start_at(5)
    assert len(resumed) == 7
    tail = _collect(resumed)
    assert resumed.state_dict()["batches_consumed"] == 12
    assert len(tail) == 7
    for x, y in zip(all_batches[5:], tail, strict=True):
        for key in ("source", "lead_mask", "group", "segment"):
            assert torch.equal(x[key], y[key])


def test_lead_subset_and_rlm_in_pipeline(tmp_path):
    write_shards(tmp_path, [[2] * 16], masks={0: [1] * 11 + [0]})
    ss = shard_set(tmp_path, "train")
    b = next(iter(BatchStream(_spec(ss, leads=(0, 1), batch_size=16, train=False))))
    assert not b["source"][:, 2:].any() and b["source"][:, :2].any()
    assert b["lead_mask"][:, :2].all() and not b["lead_mask"][:, 2:].any()
    batches = _collect(BatchStream(_spec(ss, batch_size=8, rlm=RandomLeadMasking())))
    mask = torch.cat([b["lead_mask"] for b in batches])
    src = torch.cat([b["source"] for b in batches])
    assert torch.equal(src.abs().sum(-1) > 0, mask)  # zero rows exactly where absent
    rate = 1 - mask.float().mean().item()
    assert 0.3 < rate < 0.7
    assert not torch.equal(batches[0]["lead_mask"][:, :11], batches[1]["lead_mask"][:, :11])
    first, second = mask[0::2], mask[1::2]
    assert not torch.equal(first, second)  # the pair's masks differ
    rec = torch.cat([b["record_index"] for b in batches])
    assert not mask[rec == 0][:, 11].any()  # absent lead stays absent


def test_url_forms(tmp_path):
    write_shards(tmp_path, [[2] * 3, [2] * 3])
    base = [
        int(r)
        for b in BatchStream(_spec(shard_set(tmp_path, "train"), train=False))
        for r in b["record_index"][0::2]
    ]
    assert base == list(range(6))
    assert shard_urls(tmp_path, "train") == [str(tmp_path / f"train-00000{i}.tar") for i in (0, 1)]
    brace = shard_set(f"{tmp_path}/train-{{000000..000001}}.tar", "train")
    assert brace.urls == shard_urls(tmp_path, "train") and brace.samples == 6
    fsspec_dir = shard_set(f"file://{tmp_path}", "train")
    assert fsspec_dir.samples == 6
    for ss in (
        brace,
        fsspec_dir,
        shard_set(f"pipe:cat {tmp_path}/train-{{000000..000001}}.tar", "train"),
    ):
        got = [int(r) for b in BatchStream(_spec(ss, train=False)) for r in b["record_index"][0::2]]
        assert got == base
    with pytest.raises(ValueError, match="epoch_batches"):
        BatchStream(_spec(shard_set(f"pipe:cat {tmp_path}/train-000000.tar", "train")))


def _drop_frames(exc: BaseException | None) -> None:
    """Clear the frames of an exception and of its context. A worker's error re-raised by the
    DataLoader (ExceptionWrapper.reraise) keeps a reference cycle through its own frame, which
    holds the DataLoader iterator: left to the garbage collector, that iterator is finalized
    after its queues' feeder threads, its worker never gets the stop message, and the collection
    (in whichever test it happens) waits 5 s (MP_STATUS_CHECK_INTERVAL) for the worker."""
    while exc is not None:
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__context__


def test_bad_sources_give_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="_info.json"):
        shard_set(tmp_path / "nowhere", "train")
    write_shards(tmp_path, [[2] * 4])
    with pytest.raises(ValueError, match="no split 'valid'.*train"):
        shard_set(tmp_path, "valid")
    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:70_000])  # truncated mid-sample
    for workers in (0, 1):
        with pytest.raises(ShardError, match="^/.*train-000000.tar: unreadable shard") as err:
            _collect(
                BatchStream(_spec(shard_set(tmp_path, "train"), train=False), num_workers=workers)
            )
        assert "\n" not in str(err.value)
        _drop_frames(err.value)
    other = tmp_path / "other"
    other.mkdir()
    with wds.TarWriter(str(other / "x-000000.tar")) as sink:
        sink.write({"__key__": "r00000000", "meta.json": b"{}"})
    (other / "_info.json").write_text(
        json.dumps({"x": {"shards": [{"file": "x-000000.tar", "samples": 1}]}})
    )
    with pytest.raises(ShardError, match=r"x-000000.tar: sample r00000000: needs seg.npy"):
        _collect(BatchStream(_spec(shard_set(other, "x"), train=False)))


def test_stream_from_config_and_group_ids(tmp_path):
    write_shards(tmp_path, [[2] * 8])
    cfg = load_config(
        "w2v_cmsc_rlm",
        [f"data.shards={tmp_path}", "data.batch_size=4", "data.num_workers=0", "data.leads=6"],
    )
    stream = stream_from_config(cfg, "pairs", rank=0, world=1, epoch=0)
    assert len(stream) == 2 and stream.spec.rlm is not None
    b = next(iter(stream))
    assert b["source"].shape == (8, 12, T) and not b["lead_mask"][:, 6:].any()
    keys = {int(r): f"p-{int(r) // 2:014x}" for r in b["record_index"]}
    assert b["group"].tolist() == [group_id(keys[int(r)]) for r in b["record_index"]]
    assert group_id("p-1") == group_id("p-1") != group_id("p-2") and group_id("p-1") >= 0


def test_stream_over_ingested_shards_matches_store(synth_shards, synth_store):
    """Shards written by `ingestion.shards` from a real store: pair values equal the store's
    segments, groups follow the (pseudonymised) patient, every training record is covered."""
    from ecgplat.store import open_store

    store = open_store(synth_store)
    train = set(store.select(split="train").tolist())
    ss = shard_set(synth_shards, "train")
    assert ss.samples == len(train) and len(ss.urls) >= 2
    batches = _collect(BatchStream(_spec(ss, mode="pairs", batch_size=4, train=False)))
    rec = torch.cat([b["record_index"] for b in batches])
    assert set(rec.tolist()) == train and len(rec) == 2 * len(train)  # 10 s: one pair each
    patient = store.records["patient_key"]
    for b in batches[:3]:
        for i in range(0, len(b["record_index"]), 2):
            r = int(b["record_index"][i])
            np.testing.assert_allclose(
                b["source"][i : i + 2].numpy(), store.record_segments(r), atol=1e-6
            )
            assert int(b["group"][i]) == group_id(patient.iloc[r])


def test_make_batch_subsets_masks_and_passes_extras():
    from training.batch import make_batch

    x = np.broadcast_to(np.arange(1, 13, dtype=np.float32)[None, :, None], (2, 12, 3)).copy()
    present = np.ones(12, dtype=bool)
    present[11] = False  # the file lacks V6
    seen = {}

    def drop_lead0_of_row1(xs, mask, rng):
        seen["mask"], seen["rng"] = mask.copy(), rng
        mask = mask.copy()
        mask[1, 0] = False
        return np.where(mask[:, :, None], xs, 0), mask

    rng = np.random.default_rng(0)
    b = make_batch(
        x, present, 7, (0, 1, 11), rlm=drop_lead0_of_row1, rng=rng, labels=np.eye(2), keys=["a"]
    )
    expected_mask = np.zeros((2, 12), dtype=bool)
    expected_mask[:, :2] = True  # V6 is in the subset but absent from the file
    assert np.array_equal(seen["mask"], expected_mask) and seen["rng"] is rng
    expected_mask[1, 0] = False
    assert b["lead_mask"].dtype == torch.bool
    assert np.array_equal(b["lead_mask"].numpy(), expected_mask)
    src = b["source"].numpy()
    assert src.dtype == np.float32 and src[0, :, 0].tolist() == [1, 2] + [0] * 10
    assert src[1, :, 0].tolist() == [0, 2] + [0] * 10
    subset = make_batch(x, present, 0, (0, 1, 11))["source"].numpy()  # no RLM: only the subset
    assert subset[1, :, 0].tolist() == [1, 2] + [0] * 9 + [12]
    assert b["record_index"].tolist() == [7, 7] and b["record_index"].dtype == torch.int64
    assert torch.equal(b["labels"], torch.eye(2, dtype=torch.float64)) and b["keys"] == ["a"]
    assert x[0, 5, 0] == 6  # the input is not modified
    full = make_batch(x, present, [3, 4])
    assert torch.equal(full["source"], torch.from_numpy(x)) and full["record_index"].tolist() == [
        3,
        4,
    ]
    with pytest.raises(ValueError, match="expected segments"):
        make_batch(x[:, :6], present, 0)
