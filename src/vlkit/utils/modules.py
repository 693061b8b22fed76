"""What code outside the model needs to know of a model that parallelism or compilation may have wrapped: the module
whose names are the model's own, whether its parameters are sharded, where they live.

Here rather than in ``vlkit.parallel`` because loading, saving and evaluating a model must not pay for importing
torch.distributed's mesh and tensor machinery (seconds) just to ask whether it is in use.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The module whose parameter names and methods are the model's own: without DDP's ``module.`` or torch.compile's
    wrapper (FSDP2 and tensor parallel change parameters in place and wrap nothing)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def is_sharded(model: nn.Module) -> bool:
    """True when some parameter is a DTensor (FSDP2, tensor parallel): every rank must join every forward, and a full
    state dict is a collective."""
    # No DTensor can exist before its module is imported, and importing it costs seconds.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and any(isinstance(p, module.DTensor) for p in model.parameters())


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's (local) parameters; the CPU for a model without any."""
    param = next(iter(model.parameters()), None)
    if param is None:
        return torch.device("cpu")
    return getattr(param, "_local_tensor", param).device  # a DTensor's local shard
