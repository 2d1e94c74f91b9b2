"""A checkpoint's encoder loaded once, with what a feature set's lineage records of it."""

from __future__ import annotations

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
        from training.models.checkpoint_file import encoder_from, load_checkpoint_hashed
        from training.normalize import mode_of

        ckpt, sha = load_checkpoint_hashed(checkpoint)
        return cls(
            Path(checkpoint),
            sha,
            ckpt["kind"],
            ckpt.get("config") or {},
            mode_of(ckpt),
            encoder_from(ckpt, checkpoint),
        )
