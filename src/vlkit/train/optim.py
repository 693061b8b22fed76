"""Optimizers with open_clip's weight-decay rule, and learning-rate schedules with warm-up."""

from __future__ import annotations

import math

import torch
from torch import nn

from vlkit.config.schema import OptimConfig, ScheduleConfig


def _strip_wrappers(name: str) -> str:
    # DDP ("module."), torch.compile ("_orig_mod.") and activation-checkpoint wrappers prefix parameter names.
    for prefix in ("module.", "_orig_mod.", "_checkpoint_wrapped_module."):
        name = name.replace(prefix, "")
    return name


def _no_decay_names(model: nn.Module) -> set[str]:
    inner = getattr(model, "module", model)
    fn = getattr(inner, "no_weight_decay", None)
    return set(fn()) if fn else set()


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Two groups: decayed matrices, and the undecayed rest (biases, norm gains, 1-d tensors, logit scale and
    whatever the model's ``no_weight_decay()`` names). Frozen parameters are left out, so they get no optimizer state.
    """
    skip = _no_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        clean = _strip_wrappers(name)
        exempt = p.ndim < 2 or "norm" in clean or clean.endswith(".bias") or clean in skip
        (no_decay if exempt and not cfg.decay_norm_and_bias else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _use_fused(cfg: OptimConfig, model: nn.Module) -> bool:
    if cfg.fused is not None:
        return cfg.fused
    p = next(model.parameters(), None)
    # Fused kernels exist for CUDA tensors; DTensor parameters (FSDP2/TP) are supported by the foreach path too.
    return p is not None and p.device.type == "cuda"


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if not groups:
        raise ValueError("no trainable parameters: every tower is frozen")
    name = cfg.name
    if name in ("adamw", "adam"):
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
        if _use_fused(cfg, model):
            kwargs["fused"] = True
        return cls(groups, **kwargs)  # Adam applies the group's weight decay as L2 on the gradient, AdamW decoupled
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if name == "adafactor":
        return torch.optim.Adafactor(groups, lr=cfg.lr)
    raise ValueError(f"optim.name={name!r} is not supported (adamw | adam | sgd | adafactor)")


def lr_lambda(cfg: ScheduleConfig, total_steps: int, base_lr: float):
    """Multiplier of the base lr at a step: linear warm-up from 0, then cosine / linear decay to ``min_lr``, or flat."""
    warmup = cfg.warmup_steps
    floor = cfg.min_lr / base_lr if base_lr > 0 else 0.0

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if cfg.name == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.name == "linear":
            return floor + (1 - floor) * (1 - progress)
        raise ValueError(f"schedule.name={cfg.name!r} is not supported (cosine | linear | constant)")

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int, base_lr: float):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps, base_lr))
