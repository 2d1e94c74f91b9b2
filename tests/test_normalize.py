"""Per-record amplitude normalisation (`data.normalize`): the function, the training stream,
store batches for validation/evaluation/embedding, checkpoints, feature lineage and queries."""

from pathlib import Path

import numpy as np
import pytest
import torch

from ecgplat.leads import parse_leads
from ecgplat.store import open_store
from training.batch import store_batches
from training.data import ShardStream, StreamSpec, shard_set
from training.normalize import mode_of, normalize_record, normalize_store_batches
from training.run_config import ConfigError, RunConfig, apply_overrides

FIXTURE = Path(__file__).parent / "fixtures" / "pretrained_tiny" / "w2v_cmsc_rlm_tiny_synth.pt"


def test_normalize_record_hand_values():
    x = np.zeros((2, 12, 2), dtype=np.float32)
    x[0, 0], x[1, 0] = [1.0, 3.0], [1.0, 3.0]  # lead I: mean 2, std 1 over the record
    x[:, 1] = 5.0  # lead II constant: zero spread -> zeros
    x[0, 2], x[1, 2] = [0.0, 0.0], [0.0, 4.0]  # lead III: mean 1, std sqrt(3)
    y = normalize_record(x, "zscore")
    np.testing.assert_allclose(y[:, 0], [[-1, 1], [-1, 1]])
    assert not y[:, 1].any() and not y[:, 3:].any()
    s3 = np.sqrt(3.0)
    np.testing.assert_allclose(y[:, 2], [[-1 / s3, -1 / s3], [-1 / s3, 3 / s3]], rtol=1e-6)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(normalize_record(x, "none"), x)
    with pytest.raises(ValueError, match="data.normalize"):
        normalize_record(x, "minmax")


def test_config_field_validated():
    cfg = apply_overrides(RunConfig(), ["data.normalize=zscore"])
    cfg.validate()
    assert cfg.data.normalize == "zscore" and RunConfig().data.normalize == "none"
    with pytest.raises(ConfigError, match="data.normalize"):
        apply_overrides(RunConfig(), ["data.normalize=minmax"]).validate()
    assert mode_of({"config": cfg.to_dict()}) == "zscore"
    assert mode_of({"config": {"data": "fairseq-path"}}) == mode_of({}) == "none"


def _expected(store, records, leads):
    keep = np.zeros(12, bool)
    keep[list(leads)] = True
    out = {}
    for r in records:
        y = normalize_record(store.record_segments(int(r)), "zscore")
        y[:, ~keep] = 0
        out[int(r)] = y
    return out


def test_store_batches_match_whole_record_normalisation(synth_store):
    store = open_store(synth_store)
    records = store.select(split="train")[:5]
    leads = parse_leads("6")
    want = _expected(store, records, leads)
    got: dict[int, list] = {}
    batches = store_batches(store, records, leads, batch_size=3)  # batches cut records in two
    for b in normalize_store_batches(store, batches, "zscore", leads):
        for x, r in zip(b["source"].numpy(), b["record_index"].numpy(), strict=True):
            got.setdefault(int(r), []).append(x)
    for r in want:
        np.testing.assert_allclose(np.stack(got[r]), want[r], rtol=1e-5, atol=1e-6)
    plain = next(iter(store_batches(store, records, leads, batch_size=3)))
    same = next(iter(normalize_store_batches(store, [plain], "none", leads)))
    assert same is plain


def test_training_stream_normalises_per_record(synth_store, synth_shards):
    store = open_store(synth_store)
    spec = StreamSpec(
        shard_set(synth_shards, "valid"),
        mode="segments",
        batch_size=4,
        train=False,
        normalize="zscore",
    )
    want = _expected(store, store.select(split="valid"), range(12))
    seen = 0
    for batch in ShardStream(spec):
        for x, r, k in zip(
            batch["source"].numpy(),
            batch["record_index"].numpy(),
            batch["segment_index"].numpy(),
            strict=True,
        ):
            np.testing.assert_allclose(x, want[int(r)][int(k)], rtol=1e-5, atol=1e-6)
            seen += 1
    assert seen == sum(len(v) for v in want.values()) > 0
    raw = next(
        iter(
            ShardStream(
                StreamSpec(
                    shard_set(synth_shards, "valid"), mode="segments", batch_size=4, train=False
                )
            )
        )
    )
    r, k = int(raw["record_index"][0]), int(raw["segment_index"][0])
    np.testing.assert_allclose(raw["source"][0].numpy(), store.record_segments(r)[k])


@pytest.fixture(scope="module")
def zscore_checkpoint(tmp_path_factory):
    ckpt = torch.load(FIXTURE, map_location="cpu", weights_only=True)
    ckpt["config"]["data"]["normalize"] = "zscore"
    path = tmp_path_factory.mktemp("ckpt") / "zscore.pt"
    torch.save(ckpt, path)
    return path


def test_embed_lineage_and_query_apply_the_checkpoint_mode(
    synth_store, zscore_checkpoint, tmp_path
):
    import shutil

    from retrieval.embed import embed_store
    from retrieval.features import load_features
    from retrieval.query import embed_signal

    store_dir = tmp_path / "store"
    shutil.copytree(synth_store, store_dir)
    out = embed_store(store_dir, zscore_checkpoint, "z", device="cpu")
    assert out["lineage"]["normalize"] == "zscore"
    feats = load_features(store_dir, "z")
    store = open_store(store_dir)
    i = 7
    row = int(np.flatnonzero(feats.record_index == i)[0])
    q = embed_signal(
        zscore_checkpoint, store.record_segments(i), store.lead_masks[i], "12", device="cpu"
    )
    np.testing.assert_allclose(feats.embeddings[row], q, atol=1e-4)
    # the same weights without normalisation embed the raw millivolts: another vector
    q_none = embed_signal(
        FIXTURE, store.record_segments(i), store.lead_masks[i], "12", device="cpu"
    )
    assert np.abs(q_none - q).max() > 1e-3
    assert embed_store(store_dir, FIXTURE, "n", device="cpu")["lineage"]["normalize"] == "none"


def test_finetune_refuses_another_mode_than_its_init(zscore_checkpoint):
    from training.tasks.finetune import check_init_normalize

    cfg = apply_overrides(RunConfig(), [f"finetune.init={zscore_checkpoint}"])
    with pytest.raises(ValueError, match="data.normalize=zscore"):
        check_init_normalize(cfg)
    check_init_normalize(apply_overrides(cfg, ["data.normalize=zscore"]))  # same: accepted


def test_zscore_embed_reads_each_segment_once_and_equals_the_per_record_path(
    zscore_checkpoint, tmp_path, monkeypatch
):
    """Records of 2 and 5 segments cut by batches of 3 and commits of 6: the embed reads every
    segment once (record statistics from the rows already read), and its embeddings are bit for
    bit those of batches normalised with each record read again by itself."""
    from ecgplat.store import EcgStore
    from ingestion.pipeline import ingest
    from ingestion.synth import write_cohort
    from retrieval.embed import embed_store
    from retrieval.features import load_features
    from retrieval.model import LoadedModel
    from training.batch import make_batch
    from training.models.identifier import embed_batches

    write_cohort(tmp_path / "cohort" / "a", 7, 1, seconds=10, seed=1)
    write_cohort(tmp_path / "cohort" / "b", 3, 1, seconds=25, seed=2)
    for f in (tmp_path / "cohort" / "a").rglob("S00000[123].*"):  # ids taken by the long ones
        f.unlink()
    store_dir = tmp_path / "store"
    ingest("cinc2021", tmp_path / "cohort", store_dir, workers=0, progress=False)
    store = open_store(store_dir)
    counts = np.asarray(store.column("seg_count"))
    assert sorted(set(counts.tolist())) == [2, 5] and store.n_segments == counts.sum() == 23

    read: list[int] = []
    raw = EcgStore.read_segments_raw

    def counted(self, idx):
        read.extend(np.asarray(idx).reshape(-1).tolist())
        return raw(self, idx)

    def refused(self, i):
        raise AssertionError(f"record {i} read a second time")

    monkeypatch.setattr(EcgStore, "read_segments_raw", counted)
    monkeypatch.setattr(EcgStore, "record_segments_raw", refused)
    kw = dict(leads="6", batch_size=3, device="cpu", precision="fp32")
    embed_store(store_dir, zscore_checkpoint, "z", commit_segments=6, **kw)
    monkeypatch.undo()
    assert sorted(read) == list(range(store.n_segments))

    leads = parse_leads("6")
    rec, num = store.segment_record_index, store.segment_number
    batches = [
        make_batch(
            store.read_segments(np.arange(k, min(k + 3, store.n_segments))),
            store.lead_masks[rec[k : k + 3]],
            rec[k : k + 3],
            leads,
        )
        for k in range(0, store.n_segments, 3)
    ]
    encoder = LoadedModel.load(zscore_checkpoint).encoder
    want = embed_batches(
        encoder, normalize_store_batches(store, batches, "zscore", leads), "cpu", "fp32"
    )[0]
    got = load_features(store_dir, "z", "segment")
    assert np.array_equal(got.record_index, rec) and np.array_equal(got.segment_number, num)
    assert np.array_equal(got.embeddings, want)
