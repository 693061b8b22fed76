"""The model under evaluation: device, precision (autocast), eval mode, the methods it must answer, and the setup
zero-shot and retrieval share."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlkit.eval.distributed import refuse_lone_shard, resolve_shard
from vlkit.eval.results import EvalUsageError
from vlkit.utils.modules import model_device, unwrap

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` / ``"auto"``: the current CUDA device when there is one, else the CPU.

    Raises:
        EvalUsageError: an unknown device, or CUDA asked for where there is none.
    """
    if device is None or device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise EvalUsageError(f"device {device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalUsageError(f"device {device}: CUDA is not available on this machine")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision``: ``auto`` is bf16 on CUDA and fp32 (no autocast) elsewhere."""
    if precision not in PRECISIONS:
        raise EvalUsageError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return _DTYPES[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def register_forward_methods(model: nn.Module, names: Sequence[str]) -> None:
    """Make FSDP2 gather the root's parameters for ``model.<name>()`` as it does for ``forward`` (once per model)."""
    try:
        from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
    except ImportError:  # pragma: no cover - old torch
        return
    if not isinstance(model, FSDPModule):
        return
    done = getattr(model, "_vlkit_fsdp_methods", set())
    for name in names:
        if name not in done and hasattr(model, name):
            register_fsdp_forward_method(model, name)
            done.add(name)
    model._vlkit_fsdp_methods = done


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` under ``torch.no_grad()``; every submodule's own train/eval flag is put back afterwards
    (a trainer may keep frozen towers in eval mode)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, training in flags:
            m.training = training


def require_methods(model: nn.Module, names: Sequence[str], command: str, hint: str) -> None:
    missing = [n for n in names if not callable(getattr(model, n, None))]
    if missing:
        kind = type(model).__name__
        raise EvalUsageError(f"{command} needs a model with {', '.join(names)}; a {kind} has none. {hint}")


def image_size(model: nn.Module) -> tuple[int, int]:
    vision = model.config.vision
    return int(vision.img_h), int(vision.img_w)


def logit_scale(model: nn.Module, default: float = 100.0) -> float:
    """The model's (clamped) temperature, to turn cosine similarities into probabilities."""
    scale = getattr(model, "scale", None)
    if callable(scale):
        with contextlib.suppress(Exception):
            value = scale()
            value = value.full_tensor() if hasattr(value, "full_tensor") else value
            return float(value)
    return default


@dataclass
class ClipEvalSetup:
    inner: nn.Module
    shard: Any
    device: torch.device
    dtype: Any
    progress: bool
    transform: Callable[[Any], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]


def prepare_clip_eval(
    model: nn.Module, purpose: str, hint: str, *, distributed, group, precision, progress, transform, tokenizer
) -> ClipEvalSetup:
    """What zero-shot and retrieval evaluation share: the unwrapped model, the shard, device and autocast dtype,
    and the model's own eval transform and tokenizer unless the caller gives them."""
    inner = unwrap(model)
    require_methods(inner, ("encode_image", "encode_text"), purpose, hint)
    shard = resolve_shard(distributed, group)
    refuse_lone_shard(inner, shard)
    register_forward_methods(inner, ("encode_image", "encode_text"))
    device = model_device(inner)
    if transform is None:
        from vlkit.data.transforms import get_transform

        transform = get_transform(inner, train=False)
    if tokenizer is None:
        from vlkit.data.tokenizer import get_tokenizer

        text_cfg = inner.config.text
        tokenizer = get_tokenizer(text_cfg.tokenizer, text_cfg.encoder_seq_length)
    return ClipEvalSetup(inner, shard, device, autocast_dtype(precision, device), progress and shard.rank == 0,
                         transform, tokenizer)  # fmt: skip
