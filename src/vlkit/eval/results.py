"""An evaluation's outcome (:class:`EvalResult`, its JSON) and the error for a user's mistake."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlkit.utils.errors import UserError


class EvalUsageError(UserError, ValueError):
    """Bad input the user can fix (a missing path, the wrong kind of model, unlabelled data); the CLI exits 2."""


@dataclass
class EvalResult:
    """One evaluation's outcome.

    Attributes:
        task: ``zeroshot_classification``, ``zeroshot_retrieval`` or ``classification``.
        metrics: metric name -> value (CLIP_benchmark's names, see docs/evaluation.md).
        dataset: the data as named in reports (the path given, unless a name was passed).
        model: the model's name (the model directory's name, unless given).
        pretrained: where the weights came from (the model path).
        num_samples: images evaluated (over all ranks).
        info: JSON-able facts about the run (templates, classes source, skipped samples, ...).
        details: tensors and lists for further analysis (confusion matrix, per-sample predictions, ranks, ...);
            not part of the JSON.
    """

    task: str
    metrics: dict[str, float]
    dataset: str = ""
    model: str = ""
    pretrained: str = ""
    num_samples: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """CLIP_benchmark's result object (``dataset``, ``model``, ``pretrained``, ``task``, ``metrics``,
        ``language``), with vlkit's extras under ``"vlkit"``."""
        from vlkit import __version__

        return {
            "dataset": self.dataset,
            "model": self.model,
            "pretrained": self.pretrained,
            "task": self.task,
            "metrics": {k: float(v) for k, v in self.metrics.items()},
            "language": "en",
            "vlkit": {"version": __version__, "num_samples": self.num_samples, **self.info},
        }

    def write_json(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_json` to ``path`` (parents created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        return path


def model_names(model_path: str | os.PathLike | None, model_name: str | None) -> tuple[str, str]:
    """(model, pretrained) for reports: the given name, else the model directory's name; and the path."""
    path = os.fspath(model_path) if model_path is not None else ""
    name = model_name or (Path(path).name if path else "")
    return name, path
