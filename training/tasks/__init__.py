"""The training tasks by name: `TASKS[name](cfg)` builds the `Task` that `training.loop.train`
runs, and `DEFAULT_PRESET[name]` is the config preset a new run of it starts from.

* ``pretrain``: `training.tasks.pretrain.PretrainTask` (wav2vec 2.0 / CMSC / RLM);
* ``diagnosis``: `training.tasks.diagnosis.DiagnosisTask` (CinC 2021 arrhythmia classes);
* ``finetune``: `training.tasks.supervised.SupervisedTask` (any label set of the store,
  ``head.task``; diagnosis is its instance with the 26 CinC classes);
* ``identify``: `training.tasks.identify.IdentifyTask` (ArcFace patient identification).

The builders import their task module (and torch) on the first call, so that the names can be
listed without that cost (`ecgplat train --help`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from training.run_config import RunConfig
    from training.tasks.base import Task


def _pretrain(cfg: RunConfig) -> Task:
    from training.tasks.pretrain import PretrainTask

    return PretrainTask(cfg)


def _diagnosis(cfg: RunConfig) -> Task:
    from training.tasks.diagnosis import DiagnosisTask

    return DiagnosisTask(cfg)


def _finetune(cfg: RunConfig) -> Task:
    from training.tasks.supervised import SupervisedTask

    return SupervisedTask(cfg)


def _identify(cfg: RunConfig) -> Task:
    from training.tasks.identify import IdentifyTask

    return IdentifyTask(cfg)


TASKS: dict[str, Callable[[RunConfig], Task]] = {
    "pretrain": _pretrain,
    "diagnosis": _diagnosis,
    "finetune": _finetune,
    "identify": _identify,
}
DEFAULT_PRESET: dict[str, str] = {
    "pretrain": "w2v_cmsc_rlm",
    "diagnosis": "diagnosis",
    "finetune": "finetune",
    "identify": "identification",
}

__all__ = ["DEFAULT_PRESET", "TASKS"]
