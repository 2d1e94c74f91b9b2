"""Gumbel-softmax product quantizer (fs/modules/gumbel_vector_quantizer.py, combine_groups=False).

Input (B, T, C) -> logits = weight_proj(x) (C -> G*V; weight N(0, 1), bias 0) -> per group a hard
one-hot: straight-through Gumbel-softmax with temperature tau in training, argmax in eval -> the
selected codewords of ``vars`` (1, G*V, vq_dim / G; init U(0, 1)) concatenated to (B, T, vq_dim).
tau(u) = max(start * decay**u, end), with (start, end, decay) = `latent_temp` = (2, 0.5, 0.999995)
and u the update count given to ``set_num_updates``.

Perplexities (logged; prob_perplexity drives the diversity loss):
  prob_perplexity = sum_g exp(H(mean over frames of softmax(logits_g)))
  code_perplexity = sum_g exp(H(mean over frames of one_hot(argmax logits_g)))
Codeword lookup is a (G, V) x (G, V, d) contraction rather than fairseq's broadcast product,
which would materialise an (N, G*V, d) tensor; the result and its gradients are the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _perplexity(probs: torch.Tensor) -> torch.Tensor:
    """probs (G, V) -> sum over groups of exp(entropy), with fairseq's +1e-7 in the log."""
    return torch.exp(-torch.sum(probs * torch.log(probs + 1e-7), dim=-1)).sum()


class GumbelVectorQuantizer(nn.Module):
    def __init__(
        self,
        dim: int,
        num_vars: int = 320,
        groups: int = 2,
        vq_dim: int = 256,
        temp: tuple[float, float, float] = (2.0, 0.5, 0.999995),
    ):
        super().__init__()
        if vq_dim % groups:
            raise ValueError(f"vq_dim {vq_dim} must be divisible by groups {groups}")
        self.input_dim, self.num_vars, self.groups, self.vq_dim = dim, num_vars, groups, vq_dim
        self.vars = nn.Parameter(torch.empty(1, groups * num_vars, vq_dim // groups).uniform_())
        self.weight_proj = nn.Linear(dim, groups * num_vars)
        nn.init.normal_(self.weight_proj.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.weight_proj.bias)
        self.max_temp, self.min_temp, self.temp_decay = (float(t) for t in temp)
        self.curr_temp = self.max_temp

    def set_num_updates(self, num_updates: int) -> None:
        self.curr_temp = self.temperature(num_updates)

    def temperature(self, num_updates: int) -> float:
        return max(self.max_temp * self.temp_decay**num_updates, self.min_temp)

    def forward(self, x: torch.Tensor, produce_targets: bool = False) -> dict:
        """x (B, T, C) -> dict(x (B, T, vq_dim), prob_perplexity, code_perplexity, num_vars, temp
        [, targets (B, T, G) int64 code indices])."""
        bsz, tsz, fsz = x.shape
        logits = self.weight_proj(x.reshape(-1, fsz)).view(bsz * tsz, self.groups, self.num_vars)
        codes = logits.argmax(dim=-1)  # (N, G)
        hard = F.one_hot(codes, self.num_vars).to(logits.dtype)  # (N, G, V)
        # fp32 softmax and Gumbel-softmax under bf16: the perplexity (diversity loss) and the
        # sampled codes would otherwise move with bf16's 3-digit logits
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits32 = logits.float()
            result = {
                "num_vars": self.num_vars * self.groups,
                "temp": self.curr_temp,
                "code_perplexity": _perplexity(hard.float().mean(dim=0)),
                "prob_perplexity": _perplexity(torch.softmax(logits32, dim=-1).mean(dim=0)),
            }
            if self.training:
                onehot = F.gumbel_softmax(logits32, tau=self.curr_temp, hard=True)
                onehot = onehot.type_as(logits)
            else:
                onehot = hard
        if produce_targets:
            result["targets"] = onehot.argmax(dim=-1).view(bsz, tsz, self.groups).detach()
        codebook = self.vars.view(self.groups, self.num_vars, -1).to(onehot.dtype)
        q = torch.einsum("ngv,gvd->ngd", onehot, codebook)
        result["x"] = q.reshape(bsz, tsz, self.vq_dim)
        return result
