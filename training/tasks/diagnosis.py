"""DiagnosisTask: fine-tuning for CinC 2021 arrhythmia classification (26-class multi-label).

* model: `training.models.classifier.DiagnosisModel` on the encoder of
  `training.tasks.finetune.build_finetune_encoder` (strict load of `finetune.init`, the
  fine-tune dropouts of the original's `diagnosis.yaml`, CNN frozen); the encoder runs under
  no_grad while num_updates < `finetune.freeze_finetune_updates`.
* data: single-segment batches of `training.data` (lead subset `data.leads`, zero-filled).
* loss: binary cross-entropy with logits, summed; sample size B * 26 (fairseq semantics).
* validation every epoch on the valid split (valid shards beside the training shards, else the
  store's valid split): the classification report at segment level (`cinc_score`,
  `auroc_macro`, ...: the paper's unit) and record level (`record_*`: probabilities averaged
  per record).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from training.run_config import RunConfig
from training.tasks.base import unwrap
from training.tasks.finetune import FinetuneTask, build_finetune_encoder


class DiagnosisTask(FinetuneTask):
    name = "diagnosis"
    checkpoint_kind = "diagnosis"

    def __init__(self, cfg: RunConfig):
        from ecgplat.labels import CLASS_NAMES

        super().__init__(cfg)
        self.classes = list(CLASS_NAMES)
        self._valid_source: tuple[str, object] | None = None

    # --- model -------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        from training.models.classifier import DiagnosisModel

        return DiagnosisModel(build_finetune_encoder(self.cfg))

    # --- step --------------------------------------------------------------------------------
    def train_step(
        self, model: nn.Module, batch: dict, num_updates: int
    ) -> tuple[torch.Tensor, int, dict]:
        logits = model(
            batch["source"],
            lead_mask=batch.get("lead_mask"),
            freeze_encoder=self.encoder_frozen(num_updates),
        )
        target = batch["labels"].to(logits.device, torch.float32)
        loss = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="sum")
        with torch.no_grad():
            pred = logits.detach().float() > 0  # sigmoid > 0.5
            hit = pred == target.bool()
            logs = {
                "accuracy": float(hit.float().mean()),
                "em_accuracy": float(hit.all(dim=1).float().mean()),
            }
        return loss, target.numel(), logs

    # --- validation --------------------------------------------------------------------------
    def valid_source(self) -> tuple[str, object] | None:
        """("shards", dir) when the shard dir lists the valid split, else ("store", path) when
        `data.store` is set, else None (no validation)."""
        if self._valid_source is None:
            from training.data import shard_set

            split, shards = self.cfg.data.valid_split, str(self.cfg.data.shards)
            try:
                # a pattern / .tar / pipe source names the training files themselves
                if shards.startswith("pipe:") or "{" in shards or shards.endswith(".tar"):
                    raise ValueError("not a shard directory")
                shard_set(shards, split)
                self._valid_source = ("shards", shards)
            except (ValueError, FileNotFoundError, KeyError):
                if self.cfg.data.store:
                    self._valid_source = ("store", self.cfg.data.store)
                else:
                    print(
                        f"warning: no '{split}' split in {self.cfg.data.shards} and no "
                        "data.store: diagnosis validation is off",
                        file=sys.stderr,
                    )
                    self._valid_source = ("none", None)
        return None if self._valid_source[0] == "none" else self._valid_source

    def _valid_batches(self, kind: str, where) -> Iterable[dict]:
        from ecgplat.leads import parse_leads
        from training.batch import store_batches
        from training.normalize import normalize_store_batches

        if kind == "shards":
            from training.data import stream_from_config

            return stream_from_config(
                self.cfg, "segments", split=self.cfg.data.valid_split, train=False
            )
        from ecgplat.store import open_store

        store = open_store(where)
        records = store.select(split=self.cfg.data.valid_split)
        leads = parse_leads(self.cfg.data.leads)
        batches = store_batches(store, records, leads, self.cfg.data.batch_size)
        return normalize_store_batches(store, batches, self.cfg.data.normalize, leads)

    def validate(self, model: nn.Module, epoch: int) -> dict | None:
        from training.evaluate_diagnosis import flat_metrics, predict, reports

        source = self.valid_source()
        if source is None:
            return None
        net = unwrap(model)
        was_training = net.training
        net.eval()
        try:
            pred = predict(net, self._valid_batches(*source))
        finally:
            net.train(was_training)
        if len(pred.labels) == 0:
            print(
                f"warning: the '{self.cfg.data.valid_split}' split is empty: no validation",
                file=sys.stderr,
            )
            return None
        return flat_metrics(reports(pred))
