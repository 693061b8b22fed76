"""Evaluation: zero-shot classification, image-text retrieval, classifier accuracy, and evaluation during training.

Results are :class:`EvalResult` objects whose ``to_json()`` is CLIP_benchmark's result format. The public API is
imported lazily so that ``vlkit --help`` does not pay for importing torch. See docs/evaluation.md.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EvalResult": "vlkit.eval.results",
    "EvalUsageError": "vlkit.eval.results",
    "evaluate_zeroshot": "vlkit.eval.zeroshot",
    "build_classifier": "vlkit.eval.zeroshot",
    "average_prompt_embeddings": "vlkit.eval.zeroshot",
    "evaluate_retrieval": "vlkit.eval.retrieval",
    "retrieval_metrics": "vlkit.eval.retrieval",
    "retrieval_ranks": "vlkit.eval.retrieval",
    "rank_metrics": "vlkit.eval.retrieval",
    "evaluate_classifier": "vlkit.eval.classify",
    "run_eval_during_training": "vlkit.eval.training",
    "imagenet_classnames": "vlkit.eval.templates",
    "openai_imagenet_templates": "vlkit.eval.templates",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vlkit.eval' has no attribute {name!r}")
