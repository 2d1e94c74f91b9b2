"""Training: the encoder model, objectives, tasks and the training loop.

Heavy modules (torch) are imported lazily: ``from training import load_encoder`` works without
importing anything until the name is used.
"""

_LAZY = {
    "load_encoder": ("training.models.checkpoint_file", "load_encoder"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'training' has no attribute {name!r}")


__all__ = list(_LAZY)
