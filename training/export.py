"""`ecgplat export`: a checkpoint as an ONNX or TorchScript file that carries its own metadata.

The exported function is `training.models.deployable`'s: inputs ``signal`` (B, 12, 2500) float32
and ``lead_mask`` (B, 12) bool, the batch dimension dynamic; outputs ``logits`` +
``probabilities`` (a classification head), ``standardized`` + ``values`` (a regression head) or
``embedding`` (the bare encoder: ``--encoder-only``, identification and pretraining checkpoints).
Normalisation stays outside the graph: ``zscore`` needs the statistics of the whole record, not
of the one 5 s segment the graph sees; the metadata says which applies.

The metadata (`build_metadata`; docs/formats.md, "Exported models") is one JSON object, stored
as the ONNX model's ``metadata_props["ecgplat"]`` or the TorchScript archive's extra file
``ecgplat.json``; `read_metadata(path)` reads it back from either. It holds no identifier: the
class names are the task's, an identification model's class map (its training patients) is
never exported, and no path is written; `build_metadata` refuses a value that looks like a
patient key.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from ecgplat.atomic import atomic_path
from ecgplat.leads import LEADS
from training.models.deployable import INPUT_NAMES, Deployable, load_deployable

FORMAT = "ecgplat-export/1"
FORMATS = ("onnx", "torchscript")
METADATA_KEY = "ecgplat"  # ONNX metadata_props key
TORCHSCRIPT_EXTRA = "ecgplat.json"  # TorchScript extra file
SAMPLE_RATE, SEGMENT_SAMPLES = 500, 2500
OPSET = 18

NORMALIZATION_HELP = {
    "none": "none: millivolts as recorded (baseline removed at ingest)",
    "zscore": "zscore: per record and lead, (x - mean) / std over all of the record's 5 s "
    "segments together; a lead with zero std stays all zero",
}


class ExportError(ValueError):
    """An export that cannot be made or a file that is not an ecgplat export (one line)."""


def _output_specs(dep: Deployable) -> list[dict[str, Any]]:
    names = dep.output_names
    if names == ("embedding",):
        width = int(dep.encoder_config["encoder_embed_dim"])
        return [
            {
                "name": "embedding",
                "shape": ["batch", width],
                "dtype": "float32",
                "meaning": "L2-normalised mean of the encoder's frames (as `ecgplat embed`)",
            }
        ]
    n = len(dep.task["classes"]) if dep.task else 0
    meaning = {
        "logits": "raw head outputs, one per class",
        "probabilities": "softmax over the classes"
        if dep.task and dep.task["kind"] == "multiclass"
        else "sigmoid of each logit; label = probability >= threshold",
        "standardized": "raw head outputs: (value - target_mean) / target_std",
        "values": "predicted values in the target's units",
    }
    return [
        {"name": name, "shape": ["batch", n], "dtype": "float32", "meaning": meaning[name]}
        for name in names
    ]


def build_metadata(dep: Deployable, fmt: str) -> dict[str, Any]:
    """The metadata of an export of `dep` in format `fmt` (module docstring); ExportError when
    a value looks like a patient key."""
    from ecgplat import __version__

    task = None
    if dep.task is not None:
        task = {k: v for k, v in dep.task.items() if k != "source"}
        task["source"] = _plain_source(dep.task.get("source") or {})
    meta = {
        "format": FORMAT,
        "file_format": fmt,
        "model": "embedding" if dep.task is None else "head",
        "checkpoint_kind": dep.kind,
        "checkpoint_sha256": dep.sha256,
        "task": task,
        "trained_leads": dep.trained_leads,
        "normalization": {"mode": dep.normalize, "description": NORMALIZATION_HELP[dep.normalize]},
        "sample_rate_hz": SAMPLE_RATE,
        "leads": list(LEADS),
        "inputs": [
            {
                "name": INPUT_NAMES[0],
                "shape": ["batch", len(LEADS), SEGMENT_SAMPLES],
                "dtype": "float32",
                "units": "mV" if dep.normalize == "none" else "normalized (see normalization)",
                "meaning": "one 5 s segment at 500 Hz, leads in the order of `leads`, absent "
                "leads zero",
            },
            {
                "name": INPUT_NAMES[1],
                "shape": ["batch", len(LEADS)],
                "dtype": "bool",
                "meaning": "True = the lead is present; False leads are zeroed by the model",
            },
        ],
        "outputs": _output_specs(dep),
        "encoder": {
            k: dep.encoder_config.get(k)
            for k in (
                "conv_feature_layers",
                "encoder_embed_dim",
                "encoder_layers",
                "encoder_attention_heads",
                "encoder_ffn_embed_dim",
            )
        },
        "opset": OPSET if fmt == "onnx" else None,
        "ecgplat_version": __version__,
        "torch_version": torch.__version__,
    }
    _refuse_patient_keys(meta)
    return meta


def _plain_source(source: dict) -> dict:
    """A task's label source without anything path-like (a table is named by its file name)."""
    out = dict(source)
    if isinstance(out.get("table"), str):
        out["table"] = Path(out["table"]).name
    return out


def _refuse_patient_keys(meta: dict) -> None:
    from ecgplat.tracking import looks_like_patient_key

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(k)
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        elif isinstance(value, str) and looks_like_patient_key(value):
            raise ExportError("the export metadata would hold a patient key; refusing to export")

    walk(meta)


def example_inputs(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs to trace with: seeded noise of ECG amplitude, one lead absent in the last row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, len(LEADS), SEGMENT_SAMPLES, generator=g) * 0.2
    mask = torch.ones(batch, len(LEADS), dtype=torch.bool)
    mask[-1, -1] = False
    return x, mask


def export_checkpoint(
    checkpoint: str | os.PathLike, fmt: str, out: str | os.PathLike, encoder_only: bool = False
) -> dict[str, Any]:
    """Export `checkpoint` to `out` (written atomically) in `fmt` ("onnx" | "torchscript");
    returns the metadata written with it. CheckpointError / ExportError name the file."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        import importlib.util

        missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            raise ExportError(
                f"--format onnx needs {', '.join(missing)}: pip install 'ecgplat[export]'"
            )
    dep = load_deployable(checkpoint, encoder_only=encoder_only)
    meta = build_metadata(dep, fmt)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), _quiet():
        if fmt == "onnx":
            _write_onnx(dep, meta, out)
        else:
            _write_torchscript(dep, meta, out)
    return meta


class _quiet:
    """Silence the exporters' progress prints, warnings and log lines (not errors)."""

    def __enter__(self):
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        self._logger = logging.getLogger("torch.onnx")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self._logger.setLevel(self._level)
        self._warnings.__exit__(*exc)


def _write_onnx(dep: Deployable, meta: dict, out: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    program = torch.onnx.export(
        dep.graph,
        example_inputs(),
        None,
        input_names=list(INPUT_NAMES),
        output_names=list(dep.output_names),
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        dynamic_shapes={INPUT_NAMES[0]: {0: batch}, INPUT_NAMES[1]: {0: batch}},
        verbose=False,
    )
    if program is None:  # not reached with dynamo=True; keeps the type checker informed
        raise ExportError(f"{out}: the ONNX exporter returned no program")
    program.model.metadata_props[METADATA_KEY] = json.dumps(meta, sort_keys=True)
    with atomic_path(out) as tmp:
        program.save(tmp, external_data=False)


def _write_torchscript(dep: Deployable, meta: dict, out: Path) -> None:
    # tracing records aten::size for the batch, so any batch size runs; check_trace would
    # re-run it on the same inputs only
    traced = torch.jit.trace(dep.graph, example_inputs(), check_trace=False)
    extra = {TORCHSCRIPT_EXTRA: json.dumps(meta, sort_keys=True)}
    with atomic_path(out) as tmp:
        torch.jit.save(traced, str(tmp), _extra_files=extra)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ecgplat metadata of an exported file (ONNX or TorchScript); ExportError when the
    file is not one."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    if zipfile.is_zipfile(path):  # a TorchScript archive
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith(f"/extra/{TORCHSCRIPT_EXTRA}")]
            if not names:
                raise ExportError(f"{path}: a zip archive without {TORCHSCRIPT_EXTRA}")
            text = z.read(names[0]).decode("utf-8")
    else:
        import onnx

        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # noqa: BLE001 - protobuf raises several types for junk
            raise ExportError(f"{path}: not an ONNX model ({type(e).__name__})") from None
        props = {p.key: p.value for p in model.metadata_props}
        if METADATA_KEY not in props:
            raise ExportError(f"{path}: an ONNX model without ecgplat metadata")
        text = props[METADATA_KEY]
    meta = json.loads(text)
    if meta.get("format") != FORMAT:
        raise ExportError(f"{path}: metadata format {meta.get('format')!r}, expected {FORMAT}")
    return meta
