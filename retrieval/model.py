"""A checkpoint's encoder loaded once, with what a feature set's lineage records of it."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class LoadedModel:
    """A checkpoint's encoder with what a feature set's lineage records of it, loaded once."""

    checkpoint: Path
    sha256: str
    kind: str
    config: dict
    normalize: str  # the data.normalize it was trained with, applied before it
    encoder: object

    @classmethod
    def load(cls, checkpoint: str | os.PathLike) -> LoadedModel:
        """CheckpointError naming the file when it is not a usable checkpoint. The file is
        read once: hashed for the lineage, then loaded from the same bytes."""
        from training.models.checkpoint_file import CheckpointError, encoder_from, load_checkpoint
        from training.normalize import mode_of

        try:
            data = Path(checkpoint).read_bytes()
        except OSError:
            raise CheckpointError(Path(checkpoint), "no such checkpoint file") from None
        sha = hashlib.sha256(data).hexdigest()
        ckpt = load_checkpoint(checkpoint, data=data)
        del data
        return cls(
            Path(checkpoint),
            sha,
            ckpt["kind"],
            ckpt.get("config") or {},
            mode_of(ckpt),
            encoder_from(ckpt, checkpoint),
        )
