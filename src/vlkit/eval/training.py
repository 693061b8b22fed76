"""Evaluation during training: the evaluators of ``vlkit eval``, run on the training model every N steps / at the end.

The trainer calls :func:`run_eval_during_training` on **every rank** (the default, sharded: each rank evaluates its
part of the data, counts are all-reduced, retrieval features gathered; this is also the only way for a model
sharded with FSDP or tensor parallelism), or on rank 0 alone with ``distributed=False`` for an unsharded model
(the other ranks then wait in their next collective, so keep such evaluations shorter than
``trainer.collective_timeout_s``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlkit.eval.data import find_classes_file
from vlkit.eval.results import EvalResult, EvalUsageError
from vlkit.eval.runtime import PRECISIONS
from vlkit.utils.modules import model_device, unwrap

log = logging.getLogger("vlkit.eval")

TASKS = ("zeroshot", "retrieval", "classify")


def eval_data_path(cfg: Any) -> str | None:
    """The held-out data of a config: ``data.val_path``, or the ``val/`` split of the synthetic shapes dataset."""
    data = cfg.data
    if data.val_path:
        return str(data.val_path)
    if data.kind == "synthetic_shapes":
        root = Path(data.train_path or "data/shapes")
        if root.name in ("train", "val"):
            root = root.parent
        return str(root / "val")
    return None


def default_tasks(cfg: Any, data_path: str | None) -> tuple[str, ...]:
    """``classify`` for a classifier; for CLIP ``retrieval``, plus ``zeroshot`` when the data has a ``classes.json``
    (next to it or one folder up), which is how labelled shards announce their class names."""
    if cfg.model.arch == "vit_classifier":
        return ("classify",)
    if cfg.model.arch != "clip":
        return ()
    tasks = ["retrieval"]
    if data_path and find_classes_file(Path(data_path)) is not None:
        tasks.insert(0, "zeroshot")
    return tuple(tasks)


def run_eval_during_training(
    model: nn.Module,
    cfg: Any,
    step: int,
    *,
    tasks: Sequence[str] | None = None,
    data: str | os.PathLike | None = None,
    distributed: bool | None = None,
    group: Any = None,
    max_samples: int | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    out_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Evaluate the training model; returns flat metrics for the trainer's logs.

    The model is put in eval mode under ``torch.no_grad()`` and every module's train/eval flag is restored
    afterwards; the RNG states are restored too, so evaluating does not change the training run.

    Args:
        model: the training model (plain, DDP-wrapped or FSDP2-sharded).
        cfg: the run's :class:`vlkit.config.Config`: ``model.arch`` picks the tasks, ``data`` the held-out data
            (:func:`eval_data_path`), ``trainer.precision`` the autocast dtype, ``trainer.micro_batch_size`` and
            ``data.num_workers`` the defaults below.
        step: the training step (names the JSON files).
        tasks: any of ``zeroshot``, ``retrieval``, ``classify``; None: :func:`default_tasks`.
        data: the held-out data (path or shard spec); None: :func:`eval_data_path`.
        distributed: None: sharded over ``group`` when torch.distributed is initialised (call on every rank);
            False: this process evaluates everything.
        group: the data-parallel process group (None: the world). Under tensor parallelism pass the data-parallel
            group, so that tensor-parallel peers see the same images.
        max_samples: evaluate at most this many images per task (over all ranks).
        batch_size: images per forward (default ``trainer.micro_batch_size``).
        num_workers: data-loading workers (default ``data.num_workers``).
        out_dir: when given, rank 0 writes each task's CLIP_benchmark JSON to
            ``<out_dir>/eval/step_<step>_<task>.json``.
        progress: show progress bars (rank 0).

    Returns:
        ``{"eval/<task>/<metric>": value}``, e.g. ``eval/zeroshot/acc1``, ``eval/retrieval/image_retrieval_recall@1``;
        the same on every rank. Empty when there is no held-out data; a task whose data does not suit it (no labels,
        no captions) is skipped with a warning rather than stopping the training run.
    """
    path = os.fspath(data) if data is not None else eval_data_path(cfg)
    if path is None:
        log.warning("evaluation skipped: no held-out data (set data.val_path)")
        return {}
    tasks = tuple(tasks) if tasks is not None else default_tasks(cfg, path)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown evaluation task(s) {unknown}; choose from {', '.join(TASKS)}")
    precision = cfg.trainer.precision if cfg.trainer.precision in PRECISIONS else "fp32"
    common = dict(
        batch_size=batch_size or cfg.trainer.micro_batch_size,
        num_workers=cfg.data.num_workers if num_workers is None else num_workers,
        precision=precision,
        distributed=distributed,
        group=group,
        max_samples=max_samples,
        progress=progress,
        dataset_name=path,
        model_name=cfg.name,
        model_path=f"{cfg.name}@step{step}",
    )
    device = model_device(unwrap(model))
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    metrics: dict[str, float] = {}
    results: list[tuple[str, EvalResult]] = []
    # DataLoader workers draw their seeds from the global generator: fork it, so resumed runs stay bit-identical.
    with torch.random.fork_rng(devices=cuda):
        for task in tasks:
            try:
                result = _run_task(task, model, path, common)
            except EvalUsageError as e:
                log.warning("evaluation %s at step %d skipped: %s", task, step, e)
                continue
            results.append((task, result))
            metrics.update({f"eval/{task}/{k}": float(v) for k, v in result.metrics.items()})
    if out_dir is not None and _is_rank0(distributed, group):
        for task, result in results:
            result.write_json(Path(out_dir) / "eval" / f"step_{step:08d}_{task}.json")
    return metrics


def _run_task(task: str, model: nn.Module, data: str, common: dict) -> EvalResult:
    if task == "zeroshot":
        from vlkit.eval.zeroshot import evaluate_zeroshot

        return evaluate_zeroshot(model, data, **common)
    if task == "retrieval":
        from vlkit.eval.retrieval import evaluate_retrieval

        return evaluate_retrieval(model, data, **common)
    from vlkit.eval.classify import evaluate_classifier

    return evaluate_classifier(model, data, **common)


def _is_rank0(distributed: bool | None, group: Any) -> bool:
    dist = torch.distributed
    if distributed is False or not (dist.is_available() and dist.is_initialized()):
        return True
    return dist.get_rank() == 0
