"""One small class per task: build model + data, turn a batch into a loss. Chosen by ``model.arch``."""

from __future__ import annotations

from vlkit.tasks.base import Task


def task_for(arch: str) -> type[Task]:
    if arch == "clip":
        from vlkit.tasks.clip import CLIPTask

        return CLIPTask
    if arch == "vit_classifier":
        from vlkit.tasks.classify import ClassifyTask

        return ClassifyTask
    if arch == "neva":
        from vlkit.tasks.neva import NevaTask

        return NevaTask
    raise NotImplementedError(f"training model.arch={arch!r} is not available yet")


__all__ = ["Task", "task_for"]
