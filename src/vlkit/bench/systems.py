"""What a benchmarked system is, and the FLOPs of its step, shared by vlkit's own system (bench/train.py) and the
peers' (bench/peers.py): every system is counted by the same rule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class System:
    """One thing to time: a step function and what it is."""

    source: str  # what exactly runs, for the record
    step: Callable[[], Any]
    precision: str
    params: int
    flops_per_step: int
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    close: Callable[[], None] = lambda: None


def clip_loss_for_count(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """open_clip's ClipLoss on one process (two logit matmuls): the loss every CLIP system is counted with, so that
    vlkit's choice of loss kernel (whose Triton FLOPs the counter cannot see) does not move its count."""
    img, txt, scale = out["image_features"].float(), out["text_features"].float(), out["logit_scale"]
    labels = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(scale * img @ txt.T, labels) + F.cross_entropy(scale * txt @ img.T, labels)) / 2


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Causal-LM cross-entropy: position t predicts token t + 1 (what transformers computes from ``labels=ids``)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def count_step_flops(meta_model: nn.Module, arch: str, inputs: dict[str, torch.Tensor]) -> int:
    """FLOPs of one forward + loss + backward of ``meta_model`` (on the meta device) at the inputs' shapes."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = {k: torch.empty_like(v, device="meta") for k, v in inputs.items()}
    meta_model.train()
    with FlopCounterMode(display=False) as fc:
        if arch == "llama":
            out = meta_model(input_ids=meta["input_ids"])
            logits = out if isinstance(out, torch.Tensor) else out.logits  # transformers returns an output object
            loss = next_token_loss(logits, meta["input_ids"])
        elif arch == "clip":
            loss = clip_loss_for_count(meta_model(meta["image"], meta["text"]))
        else:
            loss = F.cross_entropy(meta_model(meta["image"]).float(), meta["label"])
        loss.backward()
    return int(fc.get_total_flops())
