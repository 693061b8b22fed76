"""Top-k classification: the counter (accuracies, per-class recall, confusion matrix) and the pass that fills it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from vlkit.eval.data import EvalData, progress_bar
from vlkit.eval.distributed import Shard, all_gather_objects, all_reduce_sum, lockstep
from vlkit.eval.results import EvalUsageError
from vlkit.eval.runtime import autocast, image_size

# Above this many classes the confusion matrix (C x C counts) is not kept: 21k classes would need 3.5 GB.
MAX_CONFUSION_CLASSES = 4096


class TopKCounter:
    """Counts for top-k accuracy, per-class recall and the confusion matrix, summed over batches and ranks.

    Args:
        num_classes: C.
        topk: the k of the ``acc{k}`` metrics; each is capped at C (with 3 classes, ``acc5`` is top-3).
        confusion: keep the C x C confusion matrix (rows: true class, columns: top-1 prediction); None: when
            C <= :data:`MAX_CONFUSION_CLASSES`.
        keep_predictions: keep each sample's top ``keep_predictions`` classes and probabilities (0: none).
    """

    def __init__(
        self,
        num_classes: int,
        topk: Sequence[int] = (1, 5),
        confusion: bool | None = None,
        keep_predictions: int = 0,
    ) -> None:
        if num_classes < 1:
            raise ValueError("need at least one class")
        self.num_classes = num_classes
        self.topk = tuple(topk)
        self.correct = torch.zeros(len(self.topk), dtype=torch.long)
        self.support = torch.zeros(num_classes, dtype=torch.long)
        self.hits = torch.zeros(num_classes, dtype=torch.long)
        keep = num_classes <= MAX_CONFUSION_CLASSES if confusion is None else confusion
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long) if keep else None
        self.keep_predictions = min(keep_predictions, num_classes)
        self.bad_labels = 0
        self.bad_example: int | None = None
        self.predictions: dict[str, list] = {"key": [], "label": [], "topk_indices": [], "topk_probs": []}

    @property
    def count(self) -> int:
        return int(self.support.sum())

    def update(self, scores: torch.Tensor, labels: torch.Tensor, keys: Sequence[str] | None = None) -> None:
        """Add a batch: ``scores`` [B, C] (logits or similarities; higher is better), ``labels`` [B].

        Labels outside ``[0, C)`` are left out and counted (:meth:`metrics` then raises).
        """
        scores, labels = scores.detach().float().cpu(), labels.detach().long().cpu()
        c = self.num_classes
        if scores.shape[1] != c:
            raise ValueError(f"scores have {scores.shape[1]} columns for {c} classes")
        # An out-of-range label is counted, not raised here: under sharded evaluation a rank that raised alone
        # would leave the others waiting in a collective. metrics() raises once the counts are combined.
        bad = (labels < 0) | (labels >= c)
        if bad.any():
            self.bad_labels += int(bad.sum())
            if self.bad_example is None:
                self.bad_example = int(labels[bad][0])
            scores, labels = scores[~bad], labels[~bad]
            keys = [k for k, b in zip(keys, bad.tolist()) if not b] if keys is not None else None
        k = min(max(self.topk), c)
        top = scores.topk(k, dim=1).indices
        match = top == labels[:, None]
        for i, kk in enumerate(self.topk):
            self.correct[i] += int(match[:, : min(kk, c)].any(dim=1).sum())
        self.support += torch.bincount(labels, minlength=c)
        self.hits += torch.bincount(labels[match[:, 0]], minlength=c)
        if self.confusion is not None:
            self.confusion += torch.bincount(labels * c + top[:, 0], minlength=c * c).view(c, c)
        if self.keep_predictions:
            probs = scores.softmax(dim=1).topk(self.keep_predictions, dim=1)
            self.predictions["key"] += list(keys) if keys is not None else [""] * len(labels)
            self.predictions["label"].append(labels)
            self.predictions["topk_indices"].append(probs.indices)
            self.predictions["topk_probs"].append(probs.values)

    def reduce(self, shard: Shard) -> None:
        """Sum the counts (and gather the predictions, in rank order) over the ranks of ``shard``."""
        if not shard.distributed:
            return
        self.correct = all_reduce_sum(self.correct, shard)
        self.support = all_reduce_sum(self.support, shard)
        self.hits = all_reduce_sum(self.hits, shard)
        self.bad_labels = int(all_reduce_sum(torch.tensor([self.bad_labels]), shard))
        if self.confusion is not None:
            self.confusion = all_reduce_sum(self.confusion, shard)
        if self.keep_predictions:
            local = self.prediction_tensors()
            parts = all_gather_objects(local, shard)
            self.predictions = {
                "key": [k for p in parts for k in p["key"]],
                "label": [p["label"] for p in parts],
                "topk_indices": [p["topk_indices"] for p in parts],
                "topk_probs": [p["topk_probs"] for p in parts],
            }

    def metrics(self) -> dict[str, float]:
        """``acc{k}`` for each k, and ``mean_per_class_recall`` (the mean over classes that have samples).

        Raises:
            EvalUsageError: no samples, or labels outside ``[0, C)`` (class list and data do not match).
        """
        if self.bad_labels:
            example = f" (e.g. {self.bad_example})" if self.bad_example is not None else ""
            raise EvalUsageError(
                f"{self.bad_labels} label(s) outside the {self.num_classes} classes{example}: "
                "the class list does not match the data"
            )
        n = self.count
        if n == 0:
            raise EvalUsageError("no samples were evaluated")
        out = {f"acc{k}": float(self.correct[i]) / n for i, k in enumerate(self.topk)}
        present = self.support > 0
        out["mean_per_class_recall"] = float((self.hits[present].double() / self.support[present]).mean())
        return out

    def prediction_tensors(self) -> dict[str, Any]:
        """Per-sample ``key`` list, ``label`` [N], ``topk_indices`` [N, k], ``topk_probs`` [N, k]."""
        p, k = self.predictions, self.keep_predictions

        def cat(parts: list, empty: torch.Tensor) -> torch.Tensor:
            return torch.cat(parts) if parts else empty

        return {
            "key": list(p["key"]),
            "label": cat(p["label"], torch.zeros(0, dtype=torch.long)),
            "topk_indices": cat(p["topk_indices"], torch.zeros(0, k, dtype=torch.long)),
            "topk_probs": cat(p["topk_probs"], torch.zeros(0, k)),
        }


def classification_pass(
    model: nn.Module,
    data: EvalData,
    forward: Callable[[torch.Tensor], torch.Tensor],
    head: Callable[[torch.Tensor], torch.Tensor],
    counter: TopKCounter,
    *,
    shard: Shard,
    device: torch.device,
    dtype: torch.dtype | None,
    progress: bool,
    desc: str,
    keep_images: int = 0,
) -> list[torch.Tensor]:
    """Score ``data`` into ``counter``: ``forward`` (images on ``device`` -> features, under autocast), then ``head``
    (features -> [B, C] scores, in fp32). Returns this rank's first ``keep_images`` input images."""
    kept: list[torch.Tensor] = []
    n_kept = 0
    with progress_bar(progress, data.num_samples, desc) as bar:
        for batch in lockstep(data.batches, shard):
            if batch is None:
                with autocast(device, dtype):
                    forward(torch.zeros(1, 3, *image_size(model), device=device))
                continue
            if "label" not in batch:
                raise EvalUsageError(f"--data {data.name}: batches carry no class labels")
            images = batch["image"]
            with autocast(device, dtype):
                features = forward(images.to(device, non_blocking=True))
            counter.update(head(features.float()), batch["label"], batch.get("key"))
            if n_kept < keep_images:
                kept.append(images[: keep_images - n_kept].cpu())
                n_kept += len(kept[-1])
            bar.update(len(images))
    return kept
