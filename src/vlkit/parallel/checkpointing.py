"""Activation checkpointing with the specification's semantics, set per tower from its config.

- ``granularity: full, method: block, num_layers: N`` — recompute the first N blocks (one at a time).
- ``granularity: full, method: uniform, num_layers: N`` — split all blocks into groups of N and recompute each group
  from its input (only group boundaries are stored).
- ``granularity: selective`` — every block keeps the outputs of its matrix multiplies and attention and recomputes
  the cheap element-wise work (norms, activations, dropout, residual adds) in backward: most of the memory saving of
  full recomputation at a few percent of its cost (PyTorch's selective activation checkpointing).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from vlkit.config.schema import TransformerConfig
from vlkit.nn.block import Transformer


def towers(model: nn.Module) -> list[tuple[str, TransformerConfig, Transformer]]:
    """(name, tower config, block stack) of every transformer tower inside a vlkit model."""
    found = []
    for name, module in model.named_modules():
        cfg, stack = getattr(module, "config", None), getattr(module, "transformer", None)
        if isinstance(cfg, TransformerConfig) and isinstance(stack, Transformer):
            found.append((name, cfg, stack))
    return found


def checkpoint_ranges(num_blocks: int, method: str | None, num_layers: int | None) -> list[tuple[int, int]]:
    if method == "uniform":
        n = num_layers or 1
        return [(i, min(i + n, num_blocks)) for i in range(0, num_blocks, n)]
    # "block": the first num_layers blocks (all when unset), each recomputed on its own.
    count = num_blocks if num_layers is None else min(num_layers, num_blocks)
    return [(i, i + 1) for i in range(count)]


_SAVE_OPS = None


def _ops_to_save() -> set:
    global _SAVE_OPS
    if _SAVE_OPS is None:
        aten = torch.ops.aten
        names = [
            "mm", "addmm", "bmm", "convolution", "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
            "_scaled_dot_product_flash_attention_for_cpu",
        ]  # fmt: skip
        _SAVE_OPS = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    return _SAVE_OPS


def _save_matmuls_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _ops_to_save() else CheckpointPolicy.PREFER_RECOMPUTE


def selective_context_fn():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_save_matmuls_policy)


def apply_activation_checkpointing(model: nn.Module) -> list[str]:
    """Set every tower's checkpoint plan from its config; returns a description per tower that got one."""
    applied = []
    for name, cfg, stack in towers(model):
        granularity = cfg.activations_checkpoint_granularity
        if granularity is None:
            continue
        n_blocks = len(stack.blocks)
        if granularity == "selective":
            stack.checkpoint_ranges = [(i, i + 1) for i in range(n_blocks)]
            stack.checkpoint_context_fn = functools.partial(selective_context_fn)
        else:
            method, n = cfg.activations_checkpoint_method, cfg.activations_checkpoint_num_layers
            stack.checkpoint_ranges = checkpoint_ranges(n_blocks, method, n)
            stack.checkpoint_context_fn = None
        applied.append(f"{name or 'model'}: {granularity} {stack.checkpoint_ranges}")
    return applied
