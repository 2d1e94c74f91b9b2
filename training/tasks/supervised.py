"""SupervisedTask: fine-tuning an encoder with a linear head for any task of the store.

One path for every kind (`training.tasks.heads`): the model is `DiagnosisModel(encoder,
num_classes=outputs)`; the loss is BCE (binary, multilabel; `head.pos_weight`), CE
(multiclass) or MSE / Huber on the standardised target (regression; mean and std of the train
split's labels, kept in the checkpoint). `head.task` names the label set: "diagnosis" (the
26 CinC classes, read from the batches as the shards carry them; `DiagnosisTask` is this task
with that label set) or a task added with `ecgplat labels add` (read from `data.store`; the
training records without a label are left out of the stream).

Validation on the valid split (valid shards beside the training shards, else the store's):
segment-level metrics unprefixed and record-level ones (probabilities or values averaged per
record) as `record_*`; diagnosis reports the CinC classification report as before. After each
validation the per-class thresholds are fitted on the record-level valid outputs
(`head.threshold_rule`) and saved, with the task, under the checkpoint's "task" entry.
`checkpoint.best_metric=auto` picks `cinc_score` (diagnosis), `record_auroc` (binary) or
`record_auroc_macro` (multiclass, multilabel), maximised, or `record_mae` (regression),
minimised.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from ecgplat.tasks import DIAGNOSIS, TaskSpec
from training.run_config import RunConfig
from training.tasks.base import unwrap
from training.tasks.finetune import FinetuneTask, build_finetune_encoder
from training.tasks.heads import head_loss, task_entry

DEFAULT_LOSS = {"binary": "bce", "multilabel": "bce", "multiclass": "ce", "regression": "mse"}
LOSS_KINDS = {"bce": ("binary", "multilabel"), "ce": ("multiclass",)}
LOSS_KINDS["mse"] = LOSS_KINDS["huber"] = ("regression",)


class SupervisedTask(FinetuneTask):
    name = "finetune"
    checkpoint_kind = "diagnosis"  # encoder + linear head; the checkpoint's "task" says which

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self._valid_source: tuple[str, object] | None = None
        self._dense: np.ndarray | None = None  # (R, W) labels by record index, NaN = none
        self.target_mean: np.ndarray | None = None
        self.target_std: np.ndarray | None = None
        self.thresholds: list[float] | None = None
        self.threshold_rule: str | None = None
        name = cfg.head.task
        train_rows = None
        if name == "diagnosis":
            self.spec = DIAGNOSIS
            if cfg.data.store:
                from ecgplat.store import open_store

                store = open_store(cfg.data.store)
                train_rows = store.select(split=cfg.data.train_split)
                self._train_targets = store.labels[train_rows].astype(np.float32)
        else:
            self._load_labels(name)
            assert self._dense is not None
            train_rows = self._train_rows
            self._train_targets = self._dense[train_rows]
        self.classes = list(self.spec.classes)
        kind = self.spec.kind
        self.loss = DEFAULT_LOSS[kind] if cfg.head.loss == "auto" else cfg.head.loss
        if kind not in LOSS_KINDS[self.loss]:
            raise ValueError(f"head.loss={self.loss} does not fit a {kind} task ({self.spec.name})")
        if kind == "regression":
            y = self._train_targets.astype(np.float64)
            self.target_mean = y.mean(axis=0)
            std = y.std(axis=0)
            self.target_std = np.where(std > 0, std, 1.0)
        self.pos_weight = self._pos_weight(cfg.head.pos_weight, train_rows)
        if cfg.checkpoint.best_metric == "auto":
            metric, maximize = (
                ("cinc_score", True)
                if self.spec is DIAGNOSIS
                else ("record_mae", False)
                if kind == "regression"
                else ("record_auroc", True)
                if kind == "binary"
                else ("record_auroc_macro", True)
            )
            cfg.checkpoint.best_metric, cfg.checkpoint.maximize = metric, maximize

    # --- labels ------------------------------------------------------------------------------
    def _load_labels(self, name: str) -> None:
        from ecgplat.store import open_store
        from ecgplat.store.task_store import read_task

        if not self.cfg.data.store:
            raise ValueError(f"head.task={name}: the task's labels live in a store; pass --store")
        store = open_store(self.cfg.data.store)
        labels = read_task(store, name)
        self.spec = labels.spec
        self._dense = labels.dense(store.n_records)
        labelled = ~np.isnan(self._dense).any(axis=1)
        keys = np.asarray(store.column("record_key"))
        self.exclude_record_keys = frozenset(keys[store.live & ~labelled].tolist())
        self._train_rows = np.intersect1d(
            store.select(split=self.cfg.data.train_split), np.flatnonzero(labelled)
        )
        if not len(self._train_rows):
            raise ValueError(
                f"{self.cfg.data.store}: task {name}: no labelled record in the "
                f"'{self.cfg.data.train_split}' split"
            )

    def _pos_weight(self, option: str, train_rows) -> torch.Tensor | None:
        text = str(option).strip().lower()
        if text in ("", "none"):
            return None
        if self.loss != "bce":
            raise ValueError(f"head.pos_weight applies to BCE, not to {self.loss}")
        n_out = len(self.classes)
        if text == "auto":
            if train_rows is None:
                raise ValueError("head.pos_weight=auto counts the train labels: pass --store")
            y = self._train_targets
            pos = y.sum(axis=0)
            w = np.where(pos > 0, (len(y) - pos) / np.maximum(pos, 1), 1.0)
        else:
            try:
                w = np.array([float(v) for v in text.strip("[]").split(",")], dtype=np.float64)
            except ValueError:
                raise ValueError(f"head.pos_weight={option}: none, auto or numbers") from None
            if len(w) == 1:
                w = np.full(n_out, w[0])
            if len(w) != n_out or (w <= 0).any():
                raise ValueError(f"head.pos_weight={option}: {n_out} positive number(s) expected")
        return torch.tensor(w, dtype=torch.float32)

    def targets(self, batch: dict) -> torch.Tensor:
        """The batch's targets in the loss's form (class index for multiclass, standardised
        values for regression)."""
        if self._dense is None:
            return batch["labels"]
        y = self._dense[batch["record_index"].numpy()]
        kind = self.spec.kind
        if kind == "multiclass":
            return torch.from_numpy(np.nan_to_num(y[:, 0], nan=-1).astype(np.int64))
        if kind == "regression":
            assert self.target_mean is not None and self.target_std is not None
            y = (y - self.target_mean) / self.target_std
        return torch.from_numpy(y.astype(np.float32))

    # --- model -------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        from training.models.classifier import DiagnosisModel

        return DiagnosisModel(build_finetune_encoder(self.cfg), num_classes=len(self.classes))

    # --- step --------------------------------------------------------------------------------
    def train_step(
        self, model: nn.Module, batch: dict, num_updates: int
    ) -> tuple[torch.Tensor, int, dict]:
        logits = model(
            batch["source"],
            lead_mask=batch.get("lead_mask"),
            freeze_encoder=self.encoder_frozen(num_updates),
        )
        target = self.targets(batch).to(logits.device)
        loss, n = head_loss(
            logits, target, self.spec.kind, self.pos_weight, self.loss, self.cfg.head.huber_delta
        )
        with torch.no_grad():
            z = logits.detach().float()
            if self.spec.kind == "multiclass":
                logs = {"accuracy": float((z.argmax(dim=1) == target).float().mean())}
            elif self.spec.kind == "regression":
                assert self.target_std is not None
                err = (z - target.float()).abs() * torch.from_numpy(self.target_std).to(z)
                logs = {"mae": float(err.nanmean())}
            else:
                hit = (z > 0) == target.bool()  # sigmoid > 0.5
                logs = {
                    "accuracy": float(hit.float().mean()),
                    "em_accuracy": float(hit.all(dim=1).float().mean()),
                }
        return loss, n, logs

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
                        f"data.store: {self.name} validation is off",
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
        if self._dense is not None:
            records = records[~np.isnan(self._dense[records]).any(axis=1)]
        leads = parse_leads(self.cfg.data.leads)
        batches = store_batches(store, records, leads, self.cfg.data.batch_size)
        return normalize_store_batches(store, batches, self.cfg.data.normalize, leads)

    def validate(self, model: nn.Module, epoch: int) -> dict | None:
        from training.task_outputs import raw_outputs

        source = self.valid_source()
        if source is None:
            return None
        net = unwrap(model)
        was_training = net.training
        net.eval()
        try:
            out = raw_outputs(net, self._valid_batches(*source), keep_labels=self._dense is None)
        finally:
            net.train(was_training)
        if self._dense is not None:
            keep = ~np.isnan(self._dense[out.record_index]).any(axis=1)
            out.logits, out.record_index = out.logits[keep], out.record_index[keep]
            out.segment_index = out.segment_index[keep]
        if len(out.logits) == 0:
            print(
                f"warning: the '{self.cfg.data.valid_split}' split has no labelled record: "
                "no validation",
                file=sys.stderr,
            )
            return None
        return self._metrics_and_thresholds(out)

    def _metrics_and_thresholds(self, out) -> dict:
        from training.task_metrics import fit_thresholds, task_metrics
        from training.task_outputs import record_level
        from training.tasks.heads import outputs_to_predictions

        kind = self.spec.kind
        pred = outputs_to_predictions(torch.from_numpy(out.logits), self.checkpoint_task())
        scores = pred["values"] if kind == "regression" else pred["probabilities"]
        if self._dense is None:  # diagnosis: the CinC report, as before
            from training.evaluate_diagnosis import Predictions, flat_metrics, reports

            assert out.labels is not None
            dx = Predictions(scores, out.labels, out.record_index, out.segment_index)
            metrics = flat_metrics(reports(dx))
            y_seg = out.labels.astype(np.float32)
        else:
            y_seg = self._dense[out.record_index]
            metrics = {}
            for prefix, y, s in (("", y_seg, scores), ("record_", None, None)):
                if prefix:
                    records, s = record_level(scores, out.record_index)
                    y = self._dense[records]
                assert y is not None and s is not None
                y = y[:, 0].astype(np.int64) if kind == "multiclass" else y
                report = task_metrics(kind, y, s, None, self.classes, detail=False)
                metrics.update(
                    {
                        prefix + k: float(v)
                        for k, v in report.items()
                        if isinstance(v, (int, float)) and k != "n"
                    }
                )
        if kind in ("binary", "multilabel"):
            records, rec_p = record_level(scores, out.record_index)
            _, rec_y = record_level(y_seg, out.record_index)
            rule = self.cfg.head.threshold_rule
            self.thresholds = fit_thresholds(rec_y > 0.5, rec_p, rule)
            self.threshold_rule = rule
        # record level, for the run's W&B dashboard at its end (training.dashboard)
        self.last_validation = (record_level(y_seg, out.record_index)[1],
                                record_level(scores, out.record_index)[1])  # fmt: skip
        return metrics

    # --- checkpoint state --------------------------------------------------------------------
    def checkpoint_task(self) -> dict:
        """The checkpoint's "task" entry (docs/formats.md, "Checkpoints")."""
        spec: TaskSpec = self.spec
        return task_entry(
            spec,
            self.thresholds,
            self.threshold_rule,
            None if self.target_mean is None else self.target_mean.tolist(),
            None if self.target_std is None else self.target_std.tolist(),
        )

    def extra_state(self) -> dict:
        return super().extra_state() | {
            "thresholds": self.thresholds,
            "threshold_rule": self.threshold_rule,
        }

    def load_extra_state(self, state: dict) -> None:
        self.thresholds = state.get("thresholds")
        self.threshold_rule = state.get("threshold_rule")
