"""PretrainTask: wav2vec 2.0 / CMSC / RLM pretraining (fairseq-signals `wav2vec2_cmsc`).

* model: `training.models.W2VCMSCModel` from the `model.preset` with the `model.*` overrides
  (CMSC-only runs need no quantizer or projections: the bare encoder, unmasked, as the
  original's CMSC baseline); `finetune.init` continues from a checkpoint (strict load);
* data: pair batches of `training.data` (both 5 s segments of a record, RLM on the CPU);
* loss: `training.objectives.criterion.PretrainCriterion` (loss sum, sample size, logs);
* after every update the Gumbel temperature follows the update count.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from training.run_config import RunConfig
from training.tasks.base import Task, unwrap

MODEL_OVERRIDES = (
    "dropout",
    "attention_dropout",
    "activation_dropout",
    "dropout_input",
    "dropout_features",
    "feature_grad_mult",
    "mask_prob",
    "encoder_layers",
    "layer_norm_eps",
)


class EncoderOnly(nn.Module):
    """The encoder without pretraining heads, unmasked: the model of CMSC-only runs."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def set_num_updates(self, num_updates: int) -> None:
        return None

    def forward(self, source: torch.Tensor, lead_mask: torch.Tensor | None = None) -> dict:
        out = self.encoder.extract_features(source, lead_mask=lead_mask, mask=False)
        return {"frames": out.frames, "pooled": out.pooled, "features_pen": out.features_pen}


def encoder_overrides(cfg: RunConfig) -> dict:
    """EncoderConfig field overrides from the run config's `model` and `criterion` sections."""
    over = {k: getattr(cfg.model, k) for k in MODEL_OVERRIDES if getattr(cfg.model, k) is not None}
    over["num_negatives"] = cfg.criterion.num_negatives
    over["logit_temp"] = cfg.criterion.logit_temp
    return over


class PretrainTask(Task):
    name = "pretrain"
    checkpoint_kind = "pretrain"

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        # DDP must look for parameters without gradients only when some exist: mask_emb
        # without masking (CMSC only, mask_prob 0), the CNN when it is frozen
        self.find_unused_parameters = (
            not cfg.criterion.w2v
            or cfg.model.mask_prob == 0.0
            or cfg.model.feature_grad_mult == 0.0
        )
        from training.objectives.criterion import PretrainCriterion

        self.criterion = PretrainCriterion.from_config(cfg.criterion)

    def build_model(self) -> nn.Module:
        from training.models import build_pretraining_model, load_checkpoint

        model = build_pretraining_model(self.cfg.model.preset, **encoder_overrides(self.cfg))
        if not self.cfg.criterion.w2v:
            model = EncoderOnly(model.encoder)
        if self.cfg.finetune.init not in ("", "none"):
            ckpt = load_checkpoint(self.cfg.finetune.init)
            model.load_state_dict(ckpt["model"], strict=True)
        return model

    def train_batches(self, rank: int, world: int, epoch: int) -> Iterable[dict]:
        from training.data import stream_from_config

        return stream_from_config(self.cfg, "pairs", rank=rank, world=world, epoch=epoch)

    def batches_per_epoch(self, rank: int, world: int) -> int | None:
        return self.train_batches(rank, world, 1).batches_per_epoch

    def train_step(
        self, model: nn.Module, batch: dict, num_updates: int
    ) -> tuple[torch.Tensor, int, dict]:
        net_output = model(batch["source"], lead_mask=batch.get("lead_mask"))
        return self.criterion(net_output, batch)

    def on_update(self, model: nn.Module, num_updates: int) -> None:
        unwrap(model).set_num_updates(num_updates)
