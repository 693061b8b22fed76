"""What a task is to the trainer: build model and data, turn a batch into a loss. Nothing else differs per task."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlkit.config.schema import Config
from vlkit.parallel.dist import DataParallel, DistInfo

Batch = dict[str, Any]


class Task:
    """Base class; subclasses override the builders and :meth:`loss` (and :meth:`features` /
    :meth:`loss_from_features` to support the gradient cache)."""

    name = "task"
    #: True when the loss is a function of per-sample features that can be cached (the gradient-cache recipe).
    supports_gradient_cache = False

    def __init__(self, cfg: Config, dist: DistInfo, dp: DataParallel | None = None) -> None:
        self.cfg = cfg
        self.dist = dist
        # The trainer's data-parallel coordinates: every loader reads part dp.rank of dp.size (never the global rank,
        # which would give tensor-parallel peers different batches).
        self.dp = dp if dp is not None else DataParallel()

    @property
    def dp_group(self) -> Any:
        """The data-parallel process group (None: the default group, if any)."""
        return self.dp.group

    # -- building -------------------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def prepare_model(self, model: nn.Module) -> None:
        """Freeze towers etc. before parallelisation (default: nothing)."""

    def build_train_loader(self, micro_batch_size: int) -> Iterable[Batch]:
        """An iterable of batches; a loader with ``state_dict()`` / ``load_state_dict()`` gets exact resume."""
        raise NotImplementedError

    # -- the step -------------------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def features(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """Model outputs the loss is computed from: [B, ...] tensors and 0-d tensors (gradient cache)."""
        raise NotImplementedError

    def loss_from_features(self, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def start_step(self, batches: list[Batch]) -> None:
        """Called on every rank with the step's micro-batches (on the device) before the first forward. A loss
        normalised over the whole step (NeVA: supervised tokens over all micro-batches and data-parallel ranks)
        takes its totals here. Default: nothing."""

    def evaluate(self, model: nn.Module, step: int, out_dir: Any) -> dict[str, float]:
        """Held-out metrics during training, called on every rank (evaluation is sharded). Default: none."""
        return {}

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Parameter constraints after each step (CLIP clamps its logit scale), before the trainer's weight average
        (``trainer.ema_decay``) takes the step."""

    def model_dir_files(self, path: Path) -> None:
        """Add what a model directory the trainer exported (``<output_dir>/model``, ``<output_dir>/model_ema``)
        should carry beside the weights (the classify task: its class names). Called on the writing rank only."""

    def set_train_mode(self, model: nn.Module) -> None:
        """model.train(), except what must stay in eval mode (frozen towers)."""
        model.train()

    # -- checkpoints and resuming ---------------------------------------------------------------------------------
    def checkpoint_keys(self, model: nn.Module) -> set[str] | None:
        """The model state entries checkpoints hold (clean names, as in ``model.state_dict()``); None: all. What is
        left out must come back from :meth:`build_model` (NeVA: frozen towers loaded from pretrained checkpoints)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """What the task itself must carry across a resume, stored in the trainer's
        checkpoints; tensors allowed. Called on every rank when a checkpoint is written. Default: nothing."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (called when resuming, before the first step)."""

    # -- accounting -----------------------------------------------------------------------------------------------
    def batch_size(self, batch: Batch) -> int:
        return len(next(v for v in batch.values() if isinstance(v, torch.Tensor)))

    def batch_tokens(self, batch: Batch) -> int | None:
        """Tokens this (host) batch trains on, for tokens/s; None for tasks that do not count tokens."""
        return None

    def train_flops(self, batch: Batch) -> int | None:
        """Forward + backward FLOPs of this batch (for MFU), traced on the meta device; None if unknown."""
        return None

    def data_counters(self, loader: Any) -> dict[str, dict[str, int]]:
        """This rank's skipped / repaired samples by reason, ``{"skipped": {...}, "repaired": {...}}``: every
        training loader of vlkit has ``counters()``; another iterable counts nothing."""
        counters = getattr(loader, "counters", None)
        return counters() if callable(counters) else {"skipped": {}, "repaired": {}}


def to_device(batch: Batch, device: torch.device) -> Batch:
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
