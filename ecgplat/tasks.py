"""The definition of a task (a named label set): its kind, its output classes and its source.

The store keeps each task's labels (``ecgplat.store.task_store``), training fits a head per kind
(``training.tasks.heads``) and a fine-tuned checkpoint carries ``TaskSpec.to_dict()`` plus its
thresholds and target scale under ``ckpt["task"]`` (docs/formats.md, "Checkpoints").

Kinds:

* ``binary``: one output, one named positive class (``classes == (positive,)``);
* ``multiclass``: one output per class, exactly one class per record (softmax);
* ``multilabel``: one output per class, any number of classes per record (sigmoid each);
* ``regression``: one output per target column (``classes`` are the column names).

``source`` says where the labels came from: ``{"vocabulary": "cinc26"}``, ``{"field": "age"}``
or ``{"table": "<file name only>", "key": ..., "targets": [...]}`` (never a path: committed
files and checkpoints hold no machine paths).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

KINDS = ("binary", "multiclass", "multilabel", "regression")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")


def check_task_name(name: str) -> str:
    """`name` when it is a valid task name (a letter, then letters, digits, ``_ . -``; at most
    64 characters), else ValueError."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"task name {name!r}: use a letter then letters, digits, '_', '.' or '-' (<= 64)"
        )
    return name


@dataclass(frozen=True)
class TaskSpec:
    """A label set: `name`, `kind` (one of KINDS), the output names `classes` and its `source`."""

    name: str
    kind: str
    classes: tuple[str, ...]
    source: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        check_task_name(self.name)
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name}: kind {self.kind!r} is not one of {KINDS}")
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        if not self.classes:
            raise ValueError(f"task {self.name}: no classes")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"task {self.name}: duplicate class names")
        if self.kind == "binary" and len(self.classes) != 1:
            raise ValueError(f"task {self.name}: a binary task names one positive class")
        if self.kind == "multiclass" and len(self.classes) < 2:
            raise ValueError(f"task {self.name}: a multiclass task needs >= 2 classes")

    @property
    def num_outputs(self) -> int:
        """Width of the head: one output per class (binary: 1)."""
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "classes": list(self.classes),
            "source": dict(self.source),
        }

    @classmethod
    def from_dict(cls, d: dict) -> TaskSpec:
        return cls(
            name=str(d["name"]),
            kind=str(d["kind"]),
            classes=tuple(d["classes"]),
            source=dict(d.get("source") or {}),
        )


def _diagnosis() -> TaskSpec:
    from ecgplat.labels import CLASS_NAMES

    return TaskSpec("diagnosis", "multilabel", tuple(CLASS_NAMES), {"vocabulary": "cinc26"})


DIAGNOSIS: TaskSpec = _diagnosis()
"""The 26 scored CinC 2021 classes (SNOMED codes, ``ecgplat.labels.CLASS_NAMES`` order), the
default task; its labels are the store's ``labels`` array, not a task entry."""

__all__ = ["DIAGNOSIS", "KINDS", "TaskSpec", "check_task_name"]
