"""IdentifyTask: ArcFace fine-tuning for patient identification (docs/method.md §1.5, §6).

* classes: the training patients, i.e. the distinct `patient_key`s of the training records,
  sorted (identical on every rank). Corpora without patient ids (CinC 2021) give every record
  its own key, hence its own class: the paper's recipe. The class map is saved in the
  checkpoint's `extra["classes"]`.
* model: `training.models.identifier.IdentificationModel` on the encoder of
  `training.tasks.finetune.build_finetune_encoder` (strict load of `finetune.init`, the
  fine-tune dropouts of the original's identification.yaml, CNN frozen).
* data: single-segment batches of `training.data` with lead padding (`data.leads`; absent leads
  are zero rows, the original's `enable_padding_leads: true`).
* leakage guard (docs/method.md §8 item 4): PhysioNet 2021's ptb-xl subset holds the PTB-XL
  recordings (`HR%05d` = PTB-XL `ecg_id`). With `finetune.leakage_exclude_store=STORE` every
  training record present in STORE, by record key or by PTB-XL ecg_id, is dropped from training
  (the stream's `exclude_record_keys`); the count is printed and saved in
  `extra["excluded_records"]`.
* validation each epoch, when `data.store` is set: Rank-1 on its gallery/probe split
  (`ident_split`) by cosine similarity of unit embeddings: `rank1` per 5 s segment (the
  original's unit) and `record_rank1` per record (mean of its segment embeddings).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from training.ident_metrics import nearest, rank_k
from training.run_config import RunConfig
from training.tasks.base import unwrap
from training.tasks.finetune import FinetuneTask, build_finetune_encoder

_PTBXL_IN_CINC = re.compile(r"^cinc2021/HR(\d{5})$")
_PTBXL = re.compile(r"^ptbxl/(\d+)$")


def ptbxl_ecg_id(record_key: str) -> int | None:
    """The PTB-XL ecg_id behind a record key (`ptbxl/00013` or `cinc2021/HR00013`), else None."""
    m = _PTBXL.match(record_key) or _PTBXL_IN_CINC.match(record_key)
    return int(m.group(1)) if m else None


class LeakageGuard:
    """Which training records also occur in an evaluation store (same key or same PTB-XL ECG)."""

    def __init__(self, eval_record_keys: Iterable[str]):
        self.keys = frozenset(eval_record_keys)
        self.ecg_ids = frozenset(i for i in map(ptbxl_ecg_id, self.keys) if i is not None)

    @classmethod
    def from_store(cls, path) -> LeakageGuard:
        from ecgplat.store import open_store

        return cls(open_store(path).records["record_key"].tolist())

    def excluded(self, record_key: str) -> bool:
        if record_key in self.keys:
            return True
        ecg_id = ptbxl_ecg_id(record_key)
        return ecg_id is not None and ecg_id in self.ecg_ids


def training_records(cfg: RunConfig) -> list[tuple[str, str]]:
    """(record_key, patient_key) of every training record: from the store the shards were
    written from (named in `_info.json`, when it is still there unchanged), else read from the
    shards themselves."""
    from training.data import iter_records, read_info, shard_set

    split = cfg.data.train_split
    info = read_info(str(cfg.data.shards)) if "://" not in str(cfg.data.shards) else None
    src = ((info or {}).get(split) or {}).get("store") or {}
    if src.get("path"):
        try:
            from ecgplat.store import open_store

            store = open_store(src["path"])
            if store.attrs.get("store_uuid") == src.get("uuid") and store.n_records == src.get(
                "n_records"
            ):
                frame = store.records.loc[store.select(split=split)]
                if len(frame) == (info[split].get("samples") or len(frame)):
                    return list(zip(frame["record_key"], frame["patient_key"], strict=True))
        except (FileNotFoundError, ValueError, KeyError):
            pass  # moved or rebuilt: fall back to the shards
    out = []
    for url in shard_set(cfg.data.shards, split).urls:
        out += [(m["record_key"], m["patient_key"]) for _, _, m in iter_records(url)]
    return out


def rank1(
    gallery: np.ndarray, gallery_pid: np.ndarray, probe: np.ndarray, probe_pid: np.ndarray
) -> float:
    """Top-1 identification accuracy: the probe's most cosine-similar gallery item has its
    patient key (unit embeddings; the original's `sim = gallery @ probe.T`, best row)."""
    if len(probe) == 0 or len(gallery) == 0:
        return float("nan")
    return rank_k(nearest(gallery, probe, k=1), gallery_pid, probe_pid, (1,))[1]


class IdentifyTask(FinetuneTask):
    name = "identify"
    checkpoint_kind = "identify"

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.guard = (
            LeakageGuard.from_store(cfg.finetune.leakage_exclude_store)
            if cfg.finetune.leakage_exclude_store
            else None
        )
        records = training_records(cfg)
        excluded = frozenset(
            r for r, _ in records if self.guard is not None and self.guard.excluded(r)
        )
        kept = [(r, p) for r, p in records if r not in excluded]
        self.excluded_records = len(records) - len(kept)
        self.exclude_record_keys = excluded or None
        if self.guard is not None and _is_main():
            print(
                f"leakage guard: excluded {self.excluded_records} of {len(records)} training "
                f"records also present in {cfg.finetune.leakage_exclude_store}",
                file=sys.stderr,
            )
        if not kept:
            raise ValueError(f"{cfg.data.shards}: no training records left for identification")
        self.classes = sorted({p for _, p in kept})
        self.class_index = {p: i for i, p in enumerate(self.classes)}

    # --- model -------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        from training.models.identifier import IdentificationModel

        c = self.cfg.criterion
        return IdentificationModel(
            build_finetune_encoder(self.cfg),
            len(self.classes),
            scale=c.arcface_scale,
            margin=c.arcface_margin,
        )

    # --- step --------------------------------------------------------------------------------
    def labels_of(self, patient_keys: list[str]) -> torch.Tensor:
        try:
            return torch.tensor([self.class_index[k] for k in patient_keys], dtype=torch.long)
        except KeyError:
            raise ValueError(
                f"{self.cfg.data.shards}: a training segment's patient is not in "
                "the class map (shards rewritten during training?)"
            ) from None

    def train_step(
        self, model: nn.Module, batch: dict, num_updates: int
    ) -> tuple[torch.Tensor, int, dict]:
        labels = self.labels_of(batch["patient_key"]).to(batch["source"].device)
        return model(
            batch["source"],
            labels,
            lead_mask=batch.get("lead_mask"),
            freeze_encoder=self.encoder_frozen(num_updates),
        )

    # --- validation --------------------------------------------------------------------------
    def validate(self, model: nn.Module, epoch: int) -> dict | None:
        if not self.cfg.data.store:
            return None
        from ecgplat.leads import parse_leads
        from ecgplat.store import open_store
        from training.batch import store_batches
        from training.models.identifier import embed_batches, record_means
        from training.normalize import normalize_store_batches

        store = open_store(self.cfg.data.store)
        leads = parse_leads(self.cfg.data.leads)
        pids = store.records["patient_key"].to_numpy()
        sets = {}
        for side in ("gallery", "probe"):
            records = store.select(ident_split=side)
            batches = store_batches(store, records, leads, self.cfg.data.batch_size)
            batches = normalize_store_batches(store, batches, self.cfg.data.normalize, leads)
            emb, rec, _ = embed_batches(unwrap(model), batches)
            rec_ids, rec_emb = record_means(emb, rec)
            sets[side] = (emb, pids[rec], rec_emb, pids[rec_ids])
        if len(sets["probe"][0]) == 0 or len(sets["gallery"][0]) == 0:
            print(
                f"warning: {self.cfg.data.store} has no gallery/probe split: no validation",
                file=sys.stderr,
            )
            return None
        g, p = sets["gallery"], sets["probe"]
        return {
            "rank1": rank1(g[0], g[1], p[0], p[1]),
            "record_rank1": rank1(g[2], g[3], p[2], p[3]),
        }

    # --- checkpoint state --------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {
            **super().extra_state(),
            "excluded_records": self.excluded_records,
            "leakage_exclude_store": self.cfg.finetune.leakage_exclude_store,
        }


def _is_main() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0
