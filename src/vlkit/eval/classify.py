"""Classification accuracy of a ViT classifier (top-1, top-5, mean per-class recall)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from vlkit.eval.data import no_samples_error, open_eval_data, skipped_counts
from vlkit.eval.distributed import refuse_lone_shard, resolve_shard
from vlkit.eval.results import EvalResult, EvalUsageError, model_names
from vlkit.eval.runtime import autocast_dtype, eval_mode
from vlkit.eval.topk import TopKCounter, classification_pass
from vlkit.utils.modules import model_device, unwrap

TASK = "classification"


def evaluate_classifier(
    model: nn.Module,
    data: str | os.PathLike | Iterable,
    *,
    transform: Callable[[Any], torch.Tensor] | None = None,
    split: str | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    precision: str = "auto",
    distributed: bool | None = None,
    group: Any = None,
    max_samples: int | None = None,
    topk: Sequence[int] = (1, 5),
    predictions_topk: int = 0,
    keep_images: int = 0,
    confusion: bool | None = None,
    progress: bool = True,
    dataset_name: str | None = None,
    model_name: str | None = None,
    model_path: str | os.PathLike | None = None,
) -> EvalResult:
    """Top-k accuracy and mean per-class recall of a classifier (``model(pixels) -> logits [B, num_classes]``).

    The data's label ``i`` must be the model's class ``i``: an ImageFolder indexes its classes by its
    ``classes.json`` (or sorted folder names), shards by their ``.cls`` member.

    Args:
        model: a :class:`vlkit.models.classifier.ViTClassifier` (or any module returning logits; also DDP / FSDP2).
        data: an ImageFolder directory, shards with ``cls`` labels, a dataset root with a ``val/`` split, or an
            iterable of batches (``{"image", "label"}`` dicts or ``(images, labels)`` pairs).
        Others: as for :func:`vlkit.eval.zeroshot.evaluate_zeroshot`.

    Returns:
        An :class:`EvalResult` with metrics ``acc1``, ``acc5``, ``mean_per_class_recall`` and details
        ``classes`` (when the data names them), ``confusion_matrix``, ``predictions``, ``images``.
    """
    inner = unwrap(model)
    if callable(getattr(inner, "encode_text", None)):
        raise EvalUsageError("this is a CLIP model: use zero-shot evaluation (vlkit eval zeroshot) instead")
    num_classes = getattr(getattr(inner, "config", None), "num_classes", None)
    if num_classes is None:
        raise EvalUsageError(f"a {type(inner).__name__} carries no config.num_classes: not a vlkit classifier")
    shard = resolve_shard(distributed, group)
    refuse_lone_shard(inner, shard)
    device = model_device(inner)
    dtype = autocast_dtype(precision, device)
    progress = progress and shard.rank == 0
    if transform is None:
        from vlkit.data.transforms import get_transform

        transform = get_transform(inner, train=False)
    ed = open_eval_data(
        data,
        transform=transform,
        batch_size=batch_size,
        shard=shard,
        labels=True,
        split=split,
        num_workers=num_workers,
        max_samples=max_samples,
    )
    if ed.classes is not None and len(ed.classes) != num_classes:
        raise EvalUsageError(f"--data {ed.name}: {len(ed.classes)} classes, but the model has {num_classes} outputs")
    counter = TopKCounter(num_classes, topk, confusion=confusion, keep_predictions=predictions_topk)
    with eval_mode(model):
        # The wrapped model's forward, so that FSDP2's hooks run; DDP's wrapper is bypassed (no collectives needed).
        forward = model if not isinstance(model, nn.parallel.DistributedDataParallel) else inner
        images = classification_pass(
            inner,
            ed,
            forward,
            lambda logits: logits,
            counter,
            shard=shard,
            device=device,
            dtype=dtype,
            progress=progress,
            desc="classify",
            keep_images=keep_images,
        )
    counter.reduce(shard)
    skipped = skipped_counts(ed, shard)
    if counter.count == 0:
        raise no_samples_error(ed, skipped, "classification needs labelled images (ImageFolder, or shards with .cls)")
    details: dict[str, Any] = {"classes": ed.classes}
    if counter.confusion is not None:
        details["confusion_matrix"] = counter.confusion
    if predictions_topk:
        details["predictions"] = counter.prediction_tensors()
    if keep_images:
        details["images"] = torch.cat(images) if images else torch.zeros(0)
    model_label, pretrained = model_names(model_path, model_name)
    return EvalResult(
        task=TASK,
        metrics=counter.metrics(),
        dataset=dataset_name or ed.name,
        model=model_label,
        pretrained=pretrained,
        num_samples=counter.count,
        info={"num_classes": num_classes, "skipped": skipped},
        details=details,
    )
