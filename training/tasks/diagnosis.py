"""DiagnosisTask: fine-tuning for CinC 2021 arrhythmia classification (26-class multi-label).

* model: `training.models.classifier.DiagnosisModel`. With `finetune.init` the encoder is
  rebuilt from that checkpoint (any kind: pretrain, imported from fairseq-signals, ...) and its
  weights are loaded strictly, the pretraining heads (quantizer, project_q, final_proj) dropped;
  `init=none` is the random-init baseline of `model.preset`. The fine-tune overrides of the
  original's `diagnosis.yaml` apply to every `model.*` field left None: dropout 0,
  attention_dropout 0, activation_dropout 0.1, dropout_input 0, layerdrop 0 and
  feature_grad_mult 0, which freezes the CNN (its parameters are marked requires_grad=False so
  that DDP and the optimizer ignore them, as is the never-used `mask_emb`).
* `finetune.freeze_finetune_updates`: the encoder runs under no_grad while num_updates < N.
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

from ecgplat.config import RunConfig
from training.tasks.base import Task, unwrap

# fairseq-signals ex/finetuning/ecg_transformer/diagnosis.yaml (method spec section 3.1)
FINETUNE_DEFAULTS = {"dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.1,
                     "dropout_input": 0.0, "dropout_features": 0.0, "feature_grad_mult": 0.0}
MODEL_FIELDS = ("dropout", "attention_dropout", "activation_dropout", "dropout_input",
                "dropout_features", "feature_grad_mult", "mask_prob", "encoder_layers",
                "layer_norm_eps")


def finetune_overrides(cfg: RunConfig) -> dict:
    """EncoderConfig overrides: the fine-tune defaults, replaced by any `model.*` value set."""
    over = dict(FINETUNE_DEFAULTS, encoder_layerdrop=0.0)
    over.update({k: getattr(cfg.model, k) for k in MODEL_FIELDS if getattr(cfg.model, k) is not None})
    return over


def has_init(cfg: RunConfig) -> bool:
    return str(cfg.finetune.init or "none").lower() not in ("", "none")


def build_finetune_encoder(cfg: RunConfig):
    """The encoder of a fine-tuning run: from `finetune.init` (strict) or fresh from the preset,
    with the fine-tune overrides; frozen parts marked requires_grad=False. Shared with the
    identification task."""
    from training.models import build_encoder, load_encoder

    over = finetune_overrides(cfg)
    if has_init(cfg):
        encoder = load_encoder(cfg.finetune.init, **over).train()
    else:
        encoder = build_encoder(cfg.model.preset, **over)
    if encoder.feature_grad_mult == 0:
        encoder.feature_extractor.requires_grad_(False)
    encoder.mask_emb.requires_grad_(False)  # fine-tuning never masks
    return encoder


class DiagnosisTask(Task):
    name = "diagnosis"
    checkpoint_kind = "diagnosis"

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        # the whole encoder is idle during the first freeze_finetune_updates updates
        self.find_unused_parameters = cfg.finetune.freeze_finetune_updates > 0
        self._valid_source: tuple[str, object] | None = None

    # --- model -------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        from training.models.classifier import DiagnosisModel

        return DiagnosisModel(build_finetune_encoder(self.cfg))

    # --- data --------------------------------------------------------------------------------
    def _stream(self, rank: int, world: int, epoch: int):
        from training.data import stream_from_config

        return stream_from_config(self.cfg, "segments", rank=rank, world=world, epoch=epoch)

    def train_batches(self, rank: int, world: int, epoch: int) -> Iterable[dict]:
        return self._stream(rank, world, epoch)

    def batches_per_epoch(self, rank: int, world: int) -> int | None:
        return self._stream(rank, world, 1).batches_per_epoch

    # --- step --------------------------------------------------------------------------------
    def train_step(self, model: nn.Module, batch: dict,
                   num_updates: int) -> tuple[torch.Tensor, int, dict]:
        freeze = num_updates < self.cfg.finetune.freeze_finetune_updates
        logits = model(batch["source"], lead_mask=batch.get("lead_mask"), freeze_encoder=freeze)
        target = batch["labels"].to(logits.device, torch.float32)
        loss = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="sum")
        with torch.no_grad():
            pred = logits.detach().float() > 0  # sigmoid > 0.5
            hit = pred == target.bool()
            logs = {"accuracy": float(hit.float().mean()),
                    "em_accuracy": float(hit.all(dim=1).float().mean())}
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
                    print(f"warning: no '{split}' split in {self.cfg.data.shards} and no "
                          "data.store: diagnosis validation is off", file=sys.stderr)
                    self._valid_source = ("none", None)
        return None if self._valid_source[0] == "none" else self._valid_source

    def _valid_batches(self, kind: str, where) -> Iterable[dict]:
        from ecgplat.leads import parse_leads
        from training.evaluate_diagnosis import store_batches

        if kind == "shards":
            from training.data import stream_from_config

            return stream_from_config(self.cfg, "segments", split=self.cfg.data.valid_split,
                                      train=False)
        from ecgplat.store import open_store

        store = open_store(where)
        records = store.select(split=self.cfg.data.valid_split)
        return store_batches(store, records, parse_leads(self.cfg.data.leads),
                             self.cfg.data.batch_size)

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
            print(f"warning: the '{self.cfg.data.valid_split}' split is empty: no validation",
                  file=sys.stderr)
            return None
        return flat_metrics(reports(pred))

    def extra_state(self) -> dict:
        from ecgplat.labels import CLASS_NAMES

        return {"classes": list(CLASS_NAMES), "leads": str(self.cfg.data.leads),
                "init": str(self.cfg.finetune.init)}


TASK_CLASS = DiagnosisTask
