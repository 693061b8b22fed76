"""Optimizers with open_clip's weight-decay rule and timm's layer-wise lr decay, and learning-rate schedules with
warm-up."""

from __future__ import annotations

import math
import re

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from vlkit.config.schema import OptimConfig, ScheduleConfig

# Names inside a ViT (vlkit.models.vit.VisionTransformer) that layer-wise lr decay sorts by depth.
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBEDDING = re.compile(r"(?:^|\.)(?:patch_embed|pos_embed|class_token|norm_pre)(?:\.|$)")


def strip_wrappers(name: str) -> str:
    """A parameter name without the prefixes wrappers add: DDP's ``module.``, torch.compile's ``_orig_mod.`` and
    activation checkpointing's ``_checkpoint_wrapped_module.``."""
    for prefix in ("module.", "_orig_mod.", "_checkpoint_wrapped_module."):
        name = name.replace(prefix, "")
    return name


def _no_decay_names(model: nn.Module) -> set[str]:
    inner = getattr(model, "module", model)
    fn = getattr(inner, "no_weight_decay", None)
    return set(fn()) if fn else set()


def layer_ids(names: list[str]) -> tuple[dict[str, int], int]:
    """Depth of each parameter of a ViT for layer-wise lr decay, and the number of blocks L (timm's grouping).

    Embeddings (patch embedding, position embedding, class tokens, the pre-norm after them) are layer 0, block ``i``
    is layer ``i + 1``, everything after the blocks (final norm, head) is layer ``L + 1``.

    Raises:
        ValueError: no ``blocks.N`` parameters, or more than one block stack (a CLIP model has two towers).
    """
    stacks, ids = set(), {}
    for name in names:
        m = _BLOCK.search(name)
        if m is not None:
            stacks.add(name[: m.start()])
            ids[name] = int(m.group(1)) + 1
    if not stacks:
        raise ValueError("optim.layer_decay needs a model with transformer blocks (parameters named blocks.N)")
    if len(stacks) > 1:
        raise ValueError(f"optim.layer_decay needs one block stack (a ViT); this model has {sorted(stacks)}")
    num_blocks = max(ids.values())
    for name in names:
        if name not in ids:
            ids[name] = 0 if _EMBEDDING.search(name) else num_blocks + 1
    return ids, num_blocks


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Two groups: decayed matrices, and the undecayed rest (biases, norm gains, 1-d tensors, logit scale and
    whatever the model's ``no_weight_decay()`` names). Frozen parameters are left out, so they get no optimizer state.

    With ``cfg.layer_decay`` each of those is split by depth (:func:`layer_ids`): layer ``k`` of ``L + 2`` gets
    ``lr = cfg.lr * layer_decay ** (L + 1 - k)`` (head 1, block i ``decay^(L-i)``, embeddings ``decay^(L+1)``),
    stored as the group's ``lr`` (the scheduler scales every group alike) and ``lr_scale``. Groups are ordered
    from the head down, so the first group's lr (the one logged) is the peak.
    """
    skip = _no_decay_names(model)
    named = [(strip_wrappers(n), p) for n, p in model.named_parameters() if p.requires_grad]
    depth, num_blocks = layer_ids([n for n, _ in named]) if cfg.layer_decay is not None else ({}, 0)
    groups: dict[tuple[int, bool], dict] = {}
    for clean, p in named:
        exempt = p.ndim < 2 or "norm" in clean or clean.endswith(".bias") or clean in skip
        decayed = not exempt or cfg.decay_norm_and_bias
        layer = depth.get(clean, 0)
        group = groups.get((layer, decayed))
        if group is None:
            group = {"params": [], "weight_decay": cfg.weight_decay if decayed else 0.0}
            if cfg.layer_decay is not None:
                scale = cfg.layer_decay ** (num_blocks + 1 - layer)
                group.update(lr=cfg.lr * scale, lr_scale=scale, layer=layer)
            groups[(layer, decayed)] = group
        group["params"].append(p)
    # Without layer decay: the decayed group, then the undecayed one (the order checkpoints have always had).
    return [groups[k] for k in sorted(groups, key=lambda k: (-k[0], not k[1]))]


def _use_fused(cfg: OptimConfig, model: nn.Module) -> bool:
    if cfg.fused is not None:
        return cfg.fused
    params = list(model.parameters())
    if not params:
        return False
    if params[0].device.type == "cuda":
        return True
    # On the CPU the fused kernel is 4-8x faster than foreach (a tiny CLIP's step spent a quarter of its time in
    # AdamW), but only for plain tensors: sharded (DTensor) parameters keep the foreach path there.
    return params[0].device.type == "cpu" and not any(isinstance(p, DTensor) for p in params)


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
