"""DiagnosisTask: fine-tuning for CinC 2021 arrhythmia classification (26-class multi-label), the
`SupervisedTask` (training.tasks.supervised) with the built-in `diagnosis` label set.

* model: `training.models.classifier.DiagnosisModel` on the encoder of
  `training.tasks.finetune.build_finetune_encoder` (strict load of `finetune.init`, the
  fine-tune dropouts of the original's `diagnosis.yaml`, CNN frozen); the encoder runs under
  no_grad while num_updates < `finetune.freeze_finetune_updates`.
* data: single-segment batches of `training.data` (lead subset `data.leads`, zero-filled); the
  labels are the 26-class multi-hot the shards carry.
* loss: binary cross-entropy with logits, summed; sample size B * 26 (fairseq semantics).
* validation every epoch on the valid split (valid shards beside the training shards, else the
  store's valid split): the classification report at segment level (`cinc_score`,
  `auroc_macro`, ...: the paper's unit) and record level (`record_*`: probabilities averaged
  per record); per-class thresholds fitted on the record-level outputs go into the
  checkpoint's "task" entry.
"""

from __future__ import annotations

from training.run_config import RunConfig
from training.tasks.supervised import SupervisedTask


class DiagnosisTask(SupervisedTask):
    name = "diagnosis"

    def __init__(self, cfg: RunConfig):
        if cfg.head.task != "diagnosis":
            raise ValueError(
                f"`train diagnosis` fits the 26 CinC classes; for head.task={cfg.head.task} "
                "run `ecgplat train finetune`"
            )
        super().__init__(cfg)
