"""ecgplat checkpoints: atomic save, safe load, rebuilding the encoder from any kind, and
strict loading of fine-tuned models (`load_strict`, `load_finetuned`).

Format (docs/ARCHITECTURE.md): a dict saved with torch.save whose values all load under
``torch.load(weights_only=True)``::

    {"format": "ecgplat-checkpoint/1", "kind": "pretrain" | "diagnosis" | "identify" | "imported",
     "encoder_config": EncoderConfig.to_dict(), "model": state dict (encoder under "encoder."),
     "config": dict, "optimizer", "scheduler", "num_updates", "rng", "data_state", "extra",
     "task": the fine-tuned task (kind "diagnosis" only; absent in older checkpoints)}

Saving goes through ``ecgplat.atomic`` (temporary file, fsync, ``os.replace``, fsync of the
folder), so an interrupted save never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch

from ecgplat.atomic import atomic_path
from training.models.encoder_config import EncoderConfig

FORMAT = "ecgplat-checkpoint/1"
KINDS = ("pretrain", "diagnosis", "identify", "imported")
ENCODER_PREFIX = "encoder."


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; ``str(e) == f"{path}: {reason}"``."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


def save_checkpoint(
    path: str | os.PathLike,
    *,
    kind: str,
    encoder_config: EncoderConfig | dict,
    model: dict,
    config: dict | None = None,
    optimizer=None,
    scheduler=None,
    num_updates: int = 0,
    rng: dict | None = None,
    data_state: dict | None = None,
    extra: dict | None = None,
    task: dict | None = None,
) -> Path:
    """Atomically write a checkpoint to ``path`` and return it. ``model`` is a state dict;
    ``task`` is a fine-tuned model's task entry (``training.tasks.heads``), left out if None."""
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; expected one of {', '.join(KINDS)}")
    if isinstance(encoder_config, EncoderConfig):
        encoder_config = encoder_config.to_dict()
    ckpt = {
        "format": FORMAT,
        "kind": kind,
        "encoder_config": dict(encoder_config),
        "model": {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in model.items()},
        "config": config or {},
        "optimizer": optimizer,
        "scheduler": scheduler,
        "num_updates": int(num_updates),
        "rng": rng or {},
        "data_state": data_state or {},
        "extra": extra or {},
    }
    if task is not None:
        ckpt["task"] = task
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu", data: bytes | None = None) -> dict:
    """Load and validate an ecgplat checkpoint (weights_only=True); CheckpointError if unusable.
    ``data``: the file's bytes when the caller already read them (e.g. to hash them), so the
    file is read once; ``path`` then only names it in errors."""
    path = Path(path)
    if data is None and not path.is_file():
        raise CheckpointError(path, "no such checkpoint file")
    try:
        source = path if data is None else io.BytesIO(data)
        ckpt = torch.load(source, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt / non-torch files
        raise CheckpointError(
            path, f"not a loadable torch checkpoint ({load_failure(e)})"
        ) from None
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        hint = (
            " (a fairseq-signals checkpoint? use `ecgplat import fairseq-signals`)"
            if isinstance(ckpt, dict) and "cfg" in ckpt
            else ""
        )
        raise CheckpointError(path, f"not an ecgplat checkpoint: no 'format' field{hint}")
    if ckpt["format"] != FORMAT:
        raise CheckpointError(
            path, f"unsupported checkpoint format {ckpt['format']!r} (expected {FORMAT!r})"
        )
    for key in ("kind", "encoder_config", "model"):
        if key not in ckpt:
            raise CheckpointError(path, f"checkpoint lacks the {key!r} field")
    if ckpt["kind"] not in KINDS:
        raise CheckpointError(path, f"unknown checkpoint kind {ckpt['kind']!r}")
    return ckpt


def load_checkpoint_hashed(path: str | os.PathLike, map_location="cpu") -> tuple[dict, str]:
    """`load_checkpoint` and the file's SHA-256, from one read of the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError:
        raise CheckpointError(path, "no such checkpoint file") from None
    return load_checkpoint(path, map_location, data=data), hashlib.sha256(data).hexdigest()


def load_failure(e: Exception) -> str:
    """The reason in an error of `torch.load(weights_only=True)`, without torch's advice to
    load with weights_only=False or to allow more globals: that would run code from the file."""
    text = str(e).strip()
    if _UNPICKLER in text:  # "Weights only load failed. <advice> WeightsUnpickler error: <why>"
        why = text.split(_UNPICKLER, 1)[1].strip().split("\n\n")[0].split(". Please")[0]
        return f"refused by the weights-only unpickler: {' '.join(why.split()).rstrip('.')}"
    first = text.splitlines()[0] if text else type(e).__name__
    return "refused by the weights-only unpickler" if "weights_only" in first else first


_UNPICKLER = "WeightsUnpickler error:"


def encoder_state_dict(ckpt: dict) -> dict:
    """The encoder's weights from a checkpoint's model state dict ("encoder." prefix removed)."""
    return {
        k[len(ENCODER_PREFIX) :]: v
        for k, v in ckpt["model"].items()
        if k.startswith(ENCODER_PREFIX)
    }


def load_encoder(path: str | os.PathLike, **overrides):
    """Rebuild the ECGEncoder of any checkpoint kind, on the CPU, in eval mode.

    ``overrides`` replace EncoderConfig fields that do not change the weights' shapes, e.g. the
    fine-tuning dropouts (dropout=0.0, attention_dropout=0.0, activation_dropout=0.1,
    dropout_input=0.0, dropout_features=0.0, encoder_layerdrop=0.0) or feature_grad_mult=0.0.
    """
    return encoder_from(load_checkpoint(path), path, **overrides)


def encoder_from(ckpt: dict, path: str | os.PathLike, **overrides):
    """``load_encoder`` for a checkpoint already loaded by ``load_checkpoint`` (``path`` names it
    in errors): a caller that also needs the checkpoint's other fields loads it once."""
    from training.models.encoder import ECGEncoder

    try:
        cfg = EncoderConfig.from_dict(ckpt["encoder_config"], **overrides)
    except (TypeError, ValueError) as e:
        raise CheckpointError(path, f"bad encoder_config: {e}") from None
    encoder = ECGEncoder(cfg)
    state = encoder_state_dict(ckpt)
    try:
        missing, unexpected = encoder.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        detail = " ".join(str(e).split())
        raise CheckpointError(
            path, f"encoder weights do not fit encoder_config: {detail[:300]}"
        ) from None
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                "missing encoder weights "
                + ", ".join(missing[:5])
                + (" ..." if len(missing) > 5 else "")
            )
        if unexpected:
            parts.append(
                "unexpected encoder weights "
                + ", ".join(unexpected[:5])
                + (" ..." if len(unexpected) > 5 else "")
            )
        raise CheckpointError(path, "; ".join(parts))
    return encoder.eval()


def load_strict(module: torch.nn.Module, state: dict, path) -> None:
    """``module.load_state_dict(state)`` that raises CheckpointError naming the missing and
    unexpected keys (or the shape mismatch) instead of a multi-line RuntimeError."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise CheckpointError(
            path, "weights do not fit the model: " + " ".join(str(e).split())[:300]
        ) from None
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            parts.append(f"{what} keys {', '.join(keys[:8])}" + (" ..." if len(keys) > 8 else ""))
    if parts:
        raise CheckpointError(path, "; ".join(parts))


def load_finetuned(
    path: str | os.PathLike,
    kind: str,
    what: str,
    head_key: str,
    head_name: str,
    build,
    map_location="cpu",
) -> tuple[torch.nn.Module, dict]:
    """Rebuild a fine-tuned model (encoder + head) from a checkpoint of `kind`, strictly, in
    eval mode. `what` names the model in errors ("a diagnosis model"); `head_key` is the head
    weight whose first dimension is the class count (`head_name` describes it);
    `build(encoder, num_classes, ckpt)` makes the model. Returns ``(model, checkpoint)``;
    raises CheckpointError naming the file and the reason."""
    from training.models.encoder import ECGEncoder

    ckpt = load_checkpoint(path, map_location=map_location)
    if ckpt["kind"] != kind:
        raise CheckpointError(
            path,
            f"a {ckpt['kind']!r} checkpoint, not {what} "
            f"(fine-tune it with `ecgplat train {kind} --init`)",
        )
    head = ckpt["model"].get(head_key)
    if head is None:
        raise CheckpointError(path, f"no {head_name} ({head_key}) in the model weights")
    try:
        encoder = ECGEncoder(EncoderConfig.from_dict(ckpt["encoder_config"]))
    except (TypeError, ValueError) as e:
        raise CheckpointError(path, f"bad encoder_config: {e}") from None
    model = build(encoder, int(head.shape[0]), ckpt)
    load_strict(model, ckpt["model"], path)
    return model.eval(), ckpt
