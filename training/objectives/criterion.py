"""The pretraining criterion: wav2vec 2.0 and/or CMSC, combined as fairseq-signals'
`Wav2Vec2WithCMSCCriterion` does (docs/method.md §3.3-3.4), with one switch per ablation:

* W2V + CMSC (`w2v=True, cmsc=True`, the paper): S = number of masked frames (B*M) and
  total = sum_frames InfoNCE + S * (w_div * diversity + w_fp * features_pen) + S * w_cmsc * L_CMSC
* W2V only (`cmsc=False`): the same without the CMSC term.
* CMSC only (`w2v=False`): S = number of segments in the batch, total = S * w_cmsc * L_CMSC.

RLM is a data option (`data.rlm`), not a criterion one. The loop divides the gradients by
the total S (over accumulation steps and ranks), so every term enters with its weight per
sample unit. Logged losses are in bits (divided by ln 2) per sample unit, as fairseq logs
them: `loss` (total / S), `w2v_loss` (InfoNCE per masked frame), `cmsc_loss`; the unweighted
`diversity` and `features_pen` terms are logged as they are.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from training.objectives.cmsc import cmsc_embeddings, cmsc_loss
from training.objectives.wav2vec2 import wav2vec2_terms

LN2 = math.log(2.0)


class PretrainCriterion:
    """Callable `(net_output, batch, generator=None) -> (loss_sum, sample_size, logs)`.

    Arguments mirror the original options: `w2v` / `cmsc` choose the terms, `loss_weights`
    = `criterion.loss_weights` (diversity, feature penalty), `num_negatives` =
    `model.num_negatives`, `logit_temp` = `model.logit_temp`, `cmsc_temp` = `criterion.temp`,
    `cmsc_weight` = `criterion.cmsc_weights` (None = 1 in the original), `cmsc_all_gather` =
    `model.all_gather`.
    """

    def __init__(
        self,
        w2v: bool = True,
        cmsc: bool = True,
        loss_weights: tuple[float, float] = (0.1, 10.0),
        num_negatives: int = 100,
        logit_temp: float = 0.1,
        cmsc_temp: float = 0.1,
        cmsc_weight: float = 1.0,
        cmsc_all_gather: bool = False,
    ):
        if not (w2v or cmsc):
            raise ValueError("criterion: at least one of w2v and cmsc must be enabled")
        if len(loss_weights) != 2:
            raise ValueError(f"criterion.loss_weights: expected 2 values, got {list(loss_weights)}")
        self.w2v, self.cmsc = bool(w2v), bool(cmsc)
        self.loss_weights = tuple(float(w) for w in loss_weights)
        self.num_negatives = int(num_negatives)
        self.logit_temp = float(logit_temp)
        self.cmsc_temp = float(cmsc_temp)
        self.cmsc_weight = float(cmsc_weight)
        self.cmsc_all_gather = bool(cmsc_all_gather)

    @classmethod
    def from_config(cls, c) -> PretrainCriterion:
        """From the `criterion` section of a RunConfig (or anything with the same fields)."""
        return cls(
            w2v=c.w2v,
            cmsc=c.cmsc,
            loss_weights=tuple(c.loss_weights),
            num_negatives=c.num_negatives,
            logit_temp=c.logit_temp,
            cmsc_temp=c.cmsc_temp,
            cmsc_weight=c.cmsc_weight,
            cmsc_all_gather=c.cmsc_all_gather,
        )

    def __call__(
        self, net_output: dict, batch: dict, generator: torch.Generator | None = None
    ) -> tuple[Tensor, int, dict]:
        logs: dict[str, float] = {}
        total: Tensor | None = None
        if self.w2v:
            t = wav2vec2_terms(net_output, self.num_negatives, self.logit_temp, generator)
            sample_size = t.sample_size
            w_div, w_fp = self.loss_weights
            total = t.infonce + sample_size * (w_div * t.diversity + w_fp * t.features_pen)
            logs.update(
                w2v_loss=t.infonce.item() / sample_size / LN2,
                diversity=float(t.diversity.item()),
                features_pen=float(t.features_pen.item()),
                accuracy=t.correct / t.count if t.count else 0.0,
                correct=float(t.correct),
                count=float(t.count),
            )
            for key in ("prob_perplexity", "code_perplexity", "temp"):
                if key in net_output:
                    logs[key] = float(torch.as_tensor(net_output[key]).item())
        else:
            sample_size = int(net_output["frames"].shape[0])
        if self.cmsc:
            h = cmsc_embeddings(net_output)
            segment = batch["segment"].to(h.device)
            group = batch["group"].to(h.device)
            loss_c = cmsc_loss(h, segment, group, self.cmsc_temp, self.cmsc_all_gather)
            if self.cmsc_all_gather and dist.is_available() and dist.is_initialized():
                # this rank holds a 1/world share of the gathered loss; scaled back so the
                # term has weight cmsc_weight after the loop's division by the summed S
                loss_c = loss_c * dist.get_world_size()
            term = sample_size * self.cmsc_weight * loss_c
            total = term if total is None else total + term
            logs["cmsc_loss"] = loss_c.item() / LN2
        logs["loss"] = total.item() / sample_size / LN2
        logs["sample_size"] = float(sample_size)
        logs["nsegments"] = (
            float(net_output["frames"].shape[0])
            if "frames" in net_output
            else float(net_output["x"].shape[0])
        )
        return total, sample_size, logs
