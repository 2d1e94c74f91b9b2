"""What a fine-tuning task (diagnosis, identification) shares.

* the encoder: rebuilt from the `finetune.init` checkpoint (any kind: pretrain, imported from
  fairseq-signals, ...) and loaded strictly, the pretraining heads (quantizer, project_q,
  final_proj) dropped; `init=none` is the random-init baseline of `model.preset`;
* the fine-tune dropout defaults of the original's `diagnosis.yaml` / `identification.yaml`
  (docs/method.md §5.1), applied to every `model.*` field left None: dropout 0,
  attention_dropout 0, activation_dropout 0.1, dropout_input 0, dropout_features 0, layerdrop 0
  and feature_grad_mult 0;
* freezing: feature_grad_mult 0 freezes the CNN (its parameters are marked requires_grad=False
  so that DDP and the optimizer ignore them, as is the never-used `mask_emb`), and the whole
  encoder runs under no_grad while num_updates < `finetune.freeze_finetune_updates`;
* `FinetuneTask`: single-segment training batches of `training.data` (lead subset `data.leads`,
  zero-filled), optionally without the records in `exclude_record_keys`, and the checkpoint's
  `extra` entries `classes`, `leads` and `init`;
* `data.normalize` must be the one `finetune.init` was pretrained with (`training.normalize`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from training.run_config import RunConfig
from training.tasks.base import Task
from training.tasks.pretrain import MODEL_OVERRIDES

# fairseq-signals ex/finetuning/ecg_transformer/diagnosis.yaml (docs/method.md §5.1)
FINETUNE_DEFAULTS = {
    "dropout": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.1,
    "dropout_input": 0.0,
    "dropout_features": 0.0,
    "feature_grad_mult": 0.0,
}


def finetune_overrides(cfg: RunConfig) -> dict:
    """EncoderConfig overrides: the fine-tune defaults, replaced by any `model.*` value set."""
    over = dict(FINETUNE_DEFAULTS, encoder_layerdrop=0.0)
    over.update(
        {k: getattr(cfg.model, k) for k in MODEL_OVERRIDES if getattr(cfg.model, k) is not None}
    )
    return over


def has_init(cfg: RunConfig) -> bool:
    """Whether `finetune.init` names a checkpoint (not empty or "none")."""
    return str(cfg.finetune.init or "none").lower() not in ("", "none")


def build_finetune_encoder(cfg: RunConfig):
    """The encoder of a fine-tuning run: from `finetune.init` (strict) or fresh from the preset,
    with the fine-tune overrides; frozen parts marked requires_grad=False."""
    from training.models import build_encoder, load_encoder

    over = finetune_overrides(cfg)
    if has_init(cfg):
        check_init_normalize(cfg)
        encoder = load_encoder(cfg.finetune.init, **over).train()
    else:
        encoder = build_encoder(cfg.model.preset, **over)
    if encoder.feature_grad_mult == 0:
        encoder.feature_extractor.requires_grad_(False)
    encoder.mask_emb.requires_grad_(False)  # fine-tuning never masks
    return encoder


def check_init_normalize(cfg: RunConfig) -> None:
    """ValueError when `finetune.init` was pretrained with another `data.normalize` than this
    run's: the encoder would see amplitudes it was never trained on."""
    from training.models.checkpoint_file import load_checkpoint
    from training.normalize import mode_of

    init_mode = mode_of(load_checkpoint(cfg.finetune.init))
    if init_mode != cfg.data.normalize:
        raise ValueError(
            f"{cfg.finetune.init}: pretrained with data.normalize={init_mode}, this run has "
            f"data.normalize={cfg.data.normalize}; set data.normalize={init_mode}"
        )


class FinetuneTask(Task):
    """Base of the fine-tuning tasks: segment batches, encoder freezing, checkpoint extras.

    Subclasses set `classes` (the output classes, saved in the checkpoint) and may set
    `exclude_record_keys` (training records left out of the stream)."""

    classes: Sequence[str] = ()
    exclude_record_keys: frozenset[str] | None = None

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        # the whole encoder is idle during the first freeze_finetune_updates updates
        self.find_unused_parameters = cfg.finetune.freeze_finetune_updates > 0

    def encoder_frozen(self, num_updates: int) -> bool:
        """Whether the encoder runs under no_grad at this update (`freeze_finetune_updates`)."""
        return num_updates < self.cfg.finetune.freeze_finetune_updates

    # --- data --------------------------------------------------------------------------------
    def _stream(self, rank: int, world: int, epoch: int):
        from training.data import stream_from_config

        return stream_from_config(
            self.cfg,
            "segments",
            rank=rank,
            world=world,
            epoch=epoch,
            exclude_record_keys=self.exclude_record_keys,
        )

    def train_batches(self, rank: int, world: int, epoch: int) -> Iterable[dict]:
        return self._stream(rank, world, epoch)

    def batches_per_epoch(self, rank: int, world: int) -> int | None:
        return self._stream(rank, world, 1).batches_per_epoch

    # --- checkpoint state --------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {
            "classes": list(self.classes),
            "leads": str(self.cfg.data.leads),
            "init": str(self.cfg.finetune.init),
        }
