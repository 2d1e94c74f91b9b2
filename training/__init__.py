"""Training: the ECG encoder and its objectives, the tasks, their typed run configuration and the
generic training loop, and the metrics and evaluation of the trained models.

`run_config` (RunConfig, YAML presets in `configs/`, `key=value` overrides) -> `launch` (a
run's config from the command line's options) -> `tasks.TASKS[name](cfg)` -> `loop.train`, with
`models`, `objectives` and `data` underneath; `cinc_metrics`, `ident_metrics` and
`evaluate_diagnosis` score the results.

Heavy modules (torch) are imported lazily: ``from training import load_encoder`` works without
importing anything until the name is used.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "load_encoder":
        from training.models.checkpoint_file import load_encoder

        return load_encoder
    raise AttributeError(f"module 'training' has no attribute {name!r}")


__all__ = ["load_encoder"]
