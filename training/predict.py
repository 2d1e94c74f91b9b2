"""Prediction with a fine-tuned checkpoint, no labels needed: `load_predictor` loads it once, and
the `Predictor` answers many calls cheaply (arrays, records read from files, a store split), one
row per record (columns: `training.prediction_table`).

What the model sees is what evaluation feeds it: 5 s segments of 2500 samples at 500 Hz in mV,
normalised per record by the checkpoint's ``data.normalize`` (`training.normalize`), leads
outside the lead subset zero-filled and masked (`training.batch.make_batch`); a record's
prediction averages its segments' probabilities (regression: values) as evaluation's
record level does (`training.cinc_metrics.aggregate_records`), and the thresholds are the
checkpoint's own (`training.tasks.heads`). The lead subset defaults to the leads the checkpoint
was fine-tuned on (``extra["leads"]``; all 12 for a checkpoint that does not say).

Segments of consecutive records share batches of ``batch_size``, in order, exactly as evaluation
batches a store split, so the same records give the same batches in both. Reading runs one record
ahead of the model in a thread (`training.prefetch`).

Records come in as objects with ``key``, ``segments`` (float32 (S, 12, 2500) mV, or None),
``lead_mask`` (bool (12,)) and ``error`` ("" or the reason it could not be read): ``RecordInput``
here, or ``ingestion.input_files.InputRecord`` for files (the command line reads them with
``ingestion.input_files.read_inputs``; training does not import ingestion, so a caller of
`Predictor.predict_files` passes that reader in).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ecgplat.leads import LEADS, parse_leads
from ecgplat.store import SEGMENT_SAMPLES
from training.prediction_table import make_row


@dataclass
class RecordInput:
    """One record for `Predictor.predict_records` (see the module docstring)."""

    key: str
    segments: np.ndarray | None
    lead_mask: np.ndarray | None
    error: str = ""


def trained_leads(ckpt: dict) -> tuple[int, ...]:
    """The lead subset a checkpoint was fine-tuned on (``extra["leads"]``), else all 12."""
    spec = (ckpt.get("extra") or {}).get("leads")
    try:
        return parse_leads(spec) if spec else tuple(range(len(LEADS)))
    except ValueError:
        return tuple(range(len(LEADS)))


def load_model(ckpt: dict, path: str | os.PathLike, task: dict) -> torch.nn.Module:
    """The encoder + linear head of a fine-tuned checkpoint (strict load, eval mode) whose head
    has one output per output of `task`; CheckpointError naming the file otherwise."""
    from training.models.checkpoint_file import CheckpointError, load_strict
    from training.models.classifier import DiagnosisModel
    from training.models.encoder import ECGEncoder
    from training.models.encoder_config import EncoderConfig

    head = ckpt["model"].get("head.weight")
    if head is None:
        raise CheckpointError(path, "no task head (head.weight) in the model weights")
    n_out = len(task["classes"])
    if int(head.shape[0]) != n_out:
        raise CheckpointError(
            path, f"the head has {int(head.shape[0])} outputs, the task {task['name']} {n_out}"
        )
    try:
        encoder = ECGEncoder(EncoderConfig.from_dict(ckpt["encoder_config"]))
    except (TypeError, ValueError) as e:
        raise CheckpointError(path, f"bad encoder_config: {e}") from None
    model = DiagnosisModel(encoder, num_classes=n_out)
    load_strict(model, ckpt["model"], path)
    return model.eval()


class Predictor:
    """A fine-tuned checkpoint loaded once (`load_predictor`), ready to predict records."""

    def __init__(
        self,
        checkpoint: Path,
        sha256: str,
        task: dict,
        model: torch.nn.Module,
        device: torch.device,
        precision: str,
        normalize: str,
        leads: tuple[int, ...],
        batch_size: int = 64,
    ):
        self.checkpoint, self.sha256, self.task = checkpoint, sha256, task
        self.model, self.device, self.precision = model, device, precision
        self.normalize, self.leads, self.batch_size = normalize, tuple(leads), int(batch_size)

    # ------------------------------------------------------------------------- the model
    def forward(self, source: torch.Tensor, lead_mask: torch.Tensor) -> np.ndarray:
        """Head outputs (B, C) float32 of one batch (source (B, 12, T) mV, already normalised
        and lead-subset)."""
        from training.precision import autocast

        with torch.inference_mode(), autocast(self.precision, self.device):
            out = self.model(source.to(self.device), lead_mask=lead_mask.to(self.device))
        return out.float().cpu().numpy()

    def record_predictions(self, outputs: np.ndarray) -> dict[str, Any]:
        """``outputs_to_predictions`` of one record from its segments' head outputs (S, C):
        probabilities (regression: values) averaged over the segments; the labels of the
        average, at the checkpoint's thresholds."""
        from training.tasks.heads import outputs_to_predictions

        seg = outputs_to_predictions(torch.from_numpy(outputs), self.task)
        if self.task["kind"] == "regression":
            values = seg["values"].astype(np.float64).mean(axis=0, keepdims=True)
            return {"values": values, "labels": values}
        p = seg["probabilities"].astype(np.float64).mean(axis=0, keepdims=True)
        # back through the head's inverse, so that the one home of the thresholds labels it
        with np.errstate(divide="ignore"):
            z = np.log(p) if self.task["kind"] == "multiclass" else np.log(p) - np.log1p(-p)
        return outputs_to_predictions(torch.from_numpy(z), self.task)

    # ------------------------------------------------------------------------- records
    def predict_records(
        self, records: Iterable, on_record: Callable[[], None] | None = None
    ) -> Iterator[dict]:
        """One row per record (objects with key, segments, lead_mask, error), in order;
        `on_record()` after each row."""
        from training.prefetch import prefetch

        stream = _Stream(self)
        # records in hand need no reading ahead (nor its thread, e.g. for one served record)
        ahead = records if isinstance(records, list | tuple) else prefetch(records, depth=2)
        for rec in ahead:
            stream.add(rec)
            yield from stream.rows(on_record)
        stream.flush()
        yield from stream.rows(on_record)

    def predict_record(
        self, segments: np.ndarray, lead_mask: np.ndarray | None = None, key: str = ""
    ) -> dict:
        """The row of ONE record given as its conditioned segments (S, 12, 2500) float32 mV
        (what ``ingestion.input_files.InputRecord`` or a store's ``record_segments`` hold) and
        its lead mask (12,) bool (default all)."""
        seg = np.asarray(segments, dtype=np.float32)
        if seg.ndim != 3 or seg.shape[1:] != (len(LEADS), SEGMENT_SAMPLES):
            raise ValueError(f"expected segments (S, 12, {SEGMENT_SAMPLES}) in mV, got {seg.shape}")
        mask = np.ones(len(LEADS), bool) if lead_mask is None else np.asarray(lead_mask, bool)
        (row,) = self.predict_records([RecordInput(key, seg, mask)])
        return row

    def predict_array(
        self,
        x: np.ndarray,
        lead_mask: np.ndarray | None = None,
        keys: Sequence[str] | None = None,
    ) -> list[dict]:
        """Rows for one record (12, samples) or several (n, 12, samples) in mV at 500 Hz, in
        canonical lead order; `lead_mask` (12,) or (n, 12) bool marks the leads present (default
        all). Each record is cut into 5 s segments from its first sample (a trailing part
        dropped), as conditioning cuts a file; the values are used as given (a stored record is
        rounded to 1 µV). A record shorter than 5 s, or with NaN or infinite values, gets an
        error row. `keys` name the rows (default "0", "1", ...)."""
        arr = np.asarray(x, dtype=np.float32)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3 or arr.shape[1] != len(LEADS):
            raise ValueError(f"expected (12, samples) or (n, 12, samples) in mV, got {arr.shape}")
        n = len(arr)
        masks = np.ones((n, len(LEADS)), bool) if lead_mask is None else np.asarray(lead_mask)
        masks = np.broadcast_to(masks.astype(bool), (n, len(LEADS)))
        names = [str(i) for i in range(n)] if keys is None else [str(k) for k in keys]
        if len(names) != n:
            raise ValueError(f"{len(names)} keys for {n} records")
        return list(self.predict_records(_array_records(arr, masks, names)))

    def predict_files(
        self,
        paths: Sequence[str | os.PathLike],
        read: Callable[[Sequence[str | os.PathLike]], Iterable],
        on_record: Callable[[], None] | None = None,
    ) -> list[dict]:
        """Rows for the records in files and folders: `read(paths)` yields them (the command
        line's: ``lambda p: read_inputs(plan_inputs(p, opts))`` of ``ingestion.input_files``);
        a file that cannot be read gets a row with its reason."""
        return list(self.predict_records(read(paths), on_record))

    def predict_store(
        self, store, split: str, on_record: Callable[[], None] | None = None
    ) -> Iterator[dict]:
        """Rows for the records of a store split (a path or an open ``EcgStore``), keyed by
        record key. ValueError when the split has no records."""
        from ecgplat.store import open_store

        st = store if hasattr(store, "select") else open_store(store)
        records = st.select(split=split)
        if records.size == 0:
            present = sorted(set(np.asarray(st.column("split"), dtype=str)) - {""})
            raise ValueError(
                f"{st.path}: split '{split}' has no records "
                f"(splits present: {', '.join(present) or 'none; run ecgplat split'})"
            )
        return self.predict_records(_store_records(st, records, self.batch_size), on_record)


class _Stream:
    """Segments of consecutive records gathered into batches of `batch_size`, and the rows of
    the records whose segments have all been through the model."""

    def __init__(self, predictor: Predictor):
        self.p = predictor
        self.waiting: list[tuple[torch.Tensor, torch.Tensor]] = []  # (source, mask) chunks
        self.n_waiting = 0
        self.outputs: list[np.ndarray] = []  # head outputs not yet handed to a record
        self.n_outputs = 0
        self.pending: list[tuple[str, int, str]] = []  # (key, segments, error), in order

    def add(self, rec) -> None:
        from training.batch import make_batch
        from training.normalize import normalize_record

        if rec.error or rec.segments is None or len(rec.segments) == 0:
            self.pending.append((rec.key, 0, rec.error or "no 5 s segment in the record"))
            return
        x = normalize_record(rec.segments, self.p.normalize)
        batch = make_batch(x, rec.lead_mask, 0, self.p.leads)
        self.waiting.append((batch["source"], batch["lead_mask"]))
        self.n_waiting += len(x)
        self.pending.append((rec.key, len(x), ""))
        while self.n_waiting >= self.p.batch_size:
            self._run(self.p.batch_size)

    def flush(self) -> None:
        while self.n_waiting:
            self._run(min(self.n_waiting, self.p.batch_size))

    def _run(self, n: int) -> None:
        if len(self.waiting) == 1:
            source, mask = self.waiting[0]
        else:
            source = torch.cat([s for s, _ in self.waiting])
            mask = torch.cat([m for _, m in self.waiting])
        self.outputs.append(self.p.forward(source[:n], mask[:n]))
        self.n_outputs += n
        self.waiting = [(source[n:], mask[n:])] if n < len(source) else []
        self.n_waiting -= n

    def rows(self, on_record: Callable[[], None] | None) -> Iterator[dict]:
        p = self.p
        while self.pending and self.pending[0][1] <= self.n_outputs:
            key, n, error = self.pending.pop(0)
            if error:
                row = make_row(p.task, key, p.sha256, error=error)
            else:
                out = np.concatenate(self.outputs) if len(self.outputs) > 1 else self.outputs[0]
                self.outputs = [out[n:]] if n < len(out) else []
                self.n_outputs -= n
                row = make_row(p.task, key, p.sha256, n, p.record_predictions(out[:n]))
            if on_record is not None:
                on_record()
            yield row


def _array_records(arr: np.ndarray, masks: np.ndarray, names: list[str]) -> Iterator[RecordInput]:
    n_seg = arr.shape[2] // SEGMENT_SAMPLES
    for i, name in enumerate(names):
        if n_seg == 0:
            reason = f"too short: {arr.shape[2]} samples < {SEGMENT_SAMPLES} (5 s at 500 Hz)"
            yield RecordInput(name, None, None, reason)
        elif not np.isfinite(arr[i]).all():
            yield RecordInput(name, None, None, "NaN or infinite values in the signal")
        else:
            seg = arr[i, :, : n_seg * SEGMENT_SAMPLES].reshape(len(LEADS), n_seg, SEGMENT_SAMPLES)
            yield RecordInput(name, np.ascontiguousarray(seg.transpose(1, 0, 2)), masks[i])


def _store_records(st, records: np.ndarray, batch_size: int) -> Iterator[RecordInput]:
    """The store's records, read in bulk about `batch_size` segments at a time."""
    starts = np.asarray(st.column("seg_start"), dtype=np.int64)[records]
    counts = np.asarray(st.column("seg_count"), dtype=np.int64)[records]
    keys = np.asarray(st.column_at("record_key", records), dtype=str)
    masks = st.lead_masks
    i = 0
    while i < len(records):
        j, total = i, 0
        while j < len(records) and (j == i or total + counts[j] <= batch_size):
            total += int(counts[j])
            j += 1
        rows = np.concatenate(
            [np.arange(s, s + c) for s, c in zip(starts[i:j], counts[i:j], strict=True)]
        )
        segs = st.read_segments(rows)
        offset = 0
        for k in range(i, j):
            c = int(counts[k])
            yield RecordInput(str(keys[k]), segs[offset : offset + c], masks[records[k]])
            offset += c
        i = j


def load_predictor(
    checkpoint: str | os.PathLike,
    device: str = "auto",
    precision: str = "fp32",
    leads: str | Sequence[str] | None = None,
    batch_size: int = 64,
) -> Predictor:
    """Load a fine-tuned checkpoint once for prediction: its task (``task_of_checkpoint``: an
    older diagnosis checkpoint is the 26 classes at 0.5), its model on `device` (auto | cpu |
    cuda), `precision` (auto | fp32 | bf16), the lead subset `leads` (a preset or comma list;
    default the checkpoint's own), its normalisation and its file's SHA-256 (the file is read
    once). CheckpointError naming the file, or ValueError naming the option."""
    from training.distributed import pick_device
    from training.models.checkpoint_file import CheckpointError, load_checkpoint_hashed
    from training.normalize import mode_of
    from training.precision import resolve_precision
    from training.tasks.heads import task_of_checkpoint

    path = Path(checkpoint)
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    try:
        lead_set = None if leads is None else parse_leads(leads)
    except ValueError as e:
        raise ValueError(f"--leads {leads}: {e}") from None
    ckpt, sha = load_checkpoint_hashed(path)
    try:
        task = task_of_checkpoint(ckpt)
        normalize = mode_of(ckpt)
    except ValueError as e:
        raise CheckpointError(path, str(e)) from None
    model = load_model(ckpt, path, task)
    dev = pick_device(device)
    return Predictor(
        path,
        sha,
        task,
        model.to(dev),
        dev,
        resolve_precision(precision, dev),
        normalize,
        trained_leads(ckpt) if lead_set is None else lead_set,
        batch_size,
    )
