"""The task heads: checkpoint task entries, head outputs -> predictions, and the losses per kind."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ecgplat.labels import CLASS_NAMES
from ecgplat.tasks import DIAGNOSIS, TaskSpec
from training.tasks.heads import head_loss, outputs_to_predictions, task_entry, task_of_checkpoint


def test_taskspec_round_trip_and_checks():
    spec = TaskSpec(
        "ef", "regression", ("ef",), {"table": "echo.csv", "key": "id", "targets": ["ef"]}
    )
    assert TaskSpec.from_dict(spec.to_dict()) == spec
    assert DIAGNOSIS.classes == tuple(CLASS_NAMES) and DIAGNOSIS.kind == "multilabel"
    with pytest.raises(ValueError, match="kind"):
        TaskSpec("x", "ordinal", ("a",))
    with pytest.raises(ValueError, match="binary"):
        TaskSpec("x", "binary", ("a", "b"))
    with pytest.raises(ValueError, match="task name"):
        TaskSpec("../x", "binary", ("a",))


def test_old_diagnosis_checkpoint_is_diagnosis_at_half():
    task = task_of_checkpoint({"kind": "diagnosis", "model": {}})
    assert task["classes"] == list(CLASS_NAMES) and task["thresholds"] == [0.5] * 26
    with pytest.raises(ValueError, match="no task head"):
        task_of_checkpoint({"kind": "pretrain"})
    bad = task_entry(TaskSpec("s", "binary", ("F",)), [0.2, 0.3])
    with pytest.raises(ValueError, match="thresholds has 2 values for 1 outputs"):
        task_of_checkpoint({"kind": "diagnosis", "task": bad})


def test_outputs_to_predictions_per_kind():
    z = torch.tensor([[0.0, 2.0, -1.0], [1.0, -3.0, 0.5]])
    ml = task_entry(TaskSpec("m", "multilabel", ("a", "b", "c")), [0.6, 0.5, 0.3])
    out = outputs_to_predictions(z, ml)
    p = 1 / (1 + np.exp(-z.numpy()))
    np.testing.assert_allclose(out["probabilities"], p, rtol=1e-6)
    np.testing.assert_array_equal(out["labels"], p >= np.array([0.6, 0.5, 0.3]))
    mc = task_entry(TaskSpec("m", "multiclass", ("a", "b", "c")))
    out = outputs_to_predictions(z, mc)
    np.testing.assert_allclose(out["probabilities"].sum(1), 1.0, rtol=1e-6)
    assert out["labels"].tolist() == [1, 0]
    reg = task_entry(TaskSpec("age", "regression", ("age",)), target_mean=[60.0], target_std=[10.0])
    out = outputs_to_predictions(torch.tensor([[0.5], [-1.0]]), reg)
    np.testing.assert_allclose(out["values"][:, 0], [65.0, 50.0])


def test_head_losses_match_torch():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 3, generator=g)
    y = (torch.rand(5, 3, generator=g) > 0.5).float()
    pw = torch.tensor([1.0, 2.0, 3.0])
    loss, n = head_loss(z, y, "multilabel", pos_weight=pw)
    ref = F.binary_cross_entropy_with_logits(z, y, pos_weight=pw, reduction="sum")
    assert n == 15 and torch.allclose(loss, ref)
    idx = torch.tensor([0, 2, -1, 1, 1])
    loss, n = head_loss(z, idx, "multiclass")
    keep = idx >= 0
    assert n == 4 and torch.allclose(loss, F.cross_entropy(z[keep], idx[keep], reduction="sum"))
    t = torch.randn(5, 1, generator=g)
    t[2] = float("nan")
    loss, n = head_loss(z[:, :1], t, "regression", regression_loss="huber")
    m = ~torch.isnan(t)
    assert n == 4 and torch.allclose(loss, F.huber_loss(z[:, :1][m], t[m], reduction="sum"))
