"""The global gradient norm of a model whose parameters live on several device meshes, and clipping by it.

Under tensor parallel the blocks' parameters are DTensors on the ``(dp, tp)`` mesh, FSDP2 puts the rest on ``dp``,
and some may stay plain (replicated) tensors. torch's ``clip_grad_norm_`` stacks the per-parameter norms and fails
when they sit on different meshes; this module computes each rank's share of ``sum |g|^p`` from its local shards,
with foreach kernels, and combines the shares with one scalar all-reduce.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank's own storage of ``t`` (its shard for a DTensor): in-place ops on it change ``t``."""
    return t._local_tensor if isinstance(t, DTensor) else t


def _grads(parameters: Iterable[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    return [p.grad for p in parameters if p.grad is not None]


def _replication(grad: torch.Tensor, world: int) -> tuple[Any, int]:
    """A grouping key for ``grad`` and how many ranks hold an identical copy of its local part.

    A plain tensor is replicated on every rank. A DTensor's local part is repeated across its mesh's Replicate
    dimensions (its Shard dimensions hold different parts, which must all be summed), and, when its mesh is a
    sub-mesh (FSDP's ``dp`` under tensor parallel), across the ``world / mesh size`` copies of that sub-mesh: every
    rank holds every parameter (the same model on every rank)."""
    if not isinstance(grad, DTensor):
        return None, world
    mesh = grad.device_mesh
    copies = world // mesh.size()
    for dim, placement in enumerate(grad.placements):
        if placement.is_replicate():
            copies *= mesh.size(dim)
    return (mesh, tuple(grad.placements)), copies


def _resolve_partial(grad: torch.Tensor) -> torch.Tensor:
    """A Partial (pending-sum) gradient's local values are not the gradient: sum them first. Rare (gradients are
    normally reduced by FSDP/TP already), so one collective for such a parameter is acceptable."""
    if isinstance(grad, DTensor) and any(p.is_partial() for p in grad.placements):
        placements = [Replicate() if p.is_partial() else p for p in grad.placements]
        return grad.redistribute(grad.device_mesh, placements)
    return grad


@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: float | None, norm_type: float = 2.0
) -> torch.Tensor:
    """The global gradient norm over all ranks; clips the gradients in place when ``max_norm`` is given.

    Works for plain tensors (replicated: counted once), DTensors with Shard/Replicate placements on any mesh (FSDP2,
    TP, 2-D FSDP x TP), and any mix of them. Collective when a gradient is a DTensor: every rank of the default
    process group must call it with the same model.

    Args:
        parameters: tensors whose ``.grad`` is measured (those without a gradient are ignored).
        max_norm: clip so that the global norm is at most this (torch's rule: factor ``max_norm / (norm + 1e-6)``,
            at most 1); None only measures.
        norm_type: the p of the p-norm; ``float("inf")`` for the largest absolute value.

    Returns:
        The norm as a plain 0-d float32 tensor on the gradients' device, identical on every rank and equal to the
        norm of the full gradients in one process. When it is inf or nan the gradients are left unchanged (the
        caller is expected to skip the step).
    """
    norm_type = float(norm_type)
    grads = [_resolve_partial(g) for g in _grads(parameters)]
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    device = local_tensor(grads[0]).device
    world = dist.get_world_size() if dist.is_initialized() else 1
    sharded = any(isinstance(g, DTensor) for g in grads)
    # Group by (mesh, placements) and device: one foreach kernel and one weight per group.
    groups: dict[Any, tuple[int, list[torch.Tensor]]] = {}
    for g in grads:
        key, copies = _replication(g, world)
        local = local_tensor(g)
        groups.setdefault((key, local.device), (copies, []))[1].append(local)
    inf = math.isinf(norm_type)
    parts = []
    for copies, tensors in groups.values():
        # An FSDP2 shard may be empty on some ranks (a dimension smaller than dp); it adds nothing, and the inf-norm
        # kernel refuses it. 0 is the identity of both the sum and the max of norms.
        nonempty = [t for t in tensors if t.numel()]
        if not nonempty:
            parts.append(torch.zeros((), dtype=torch.float32, device=device))
            continue
        # fp32 accumulation whatever the gradients' dtype: a bf16/fp16 norm would round or overflow. (A copy rather
        # than _foreach_norm's dtype argument, which older torch lacks; gradients are fp32 in every vlkit layout.)
        nonempty = [t if t.dtype == torch.float32 else t.float() for t in nonempty]
        norms = torch.stack([n.to(device) for n in torch._foreach_norm(nonempty, norm_type)])
        if inf:
            parts.append(norms.max())
        else:
            part = norms.pow(norm_type).sum()
            # Without a collective (plain tensors only) each rank already holds the whole sum.
            parts.append(part / copies if sharded else part)
    total = torch.stack(parts).max() if inf else torch.stack(parts).sum()
    if sharded and world > 1:
        # One scalar all-reduce over all ranks instead of one per mesh dimension and group: every rank adds its
        # shards' share, and a part replicated on k ranks enters with weight 1/k (k is a power of two in practice,
        # so the weighting is exact). Every rank receives the same bits, so all ranks clip alike.
        if inf:  # a max may drop a NaN (every comparison with it is false): keep it non-finite as inf
            total = torch.where(torch.isnan(total), torch.full_like(total, math.inf), total)
        dist.all_reduce(total, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM)
    if not inf:
        total = total.pow(1.0 / norm_type)
    if max_norm is not None:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        # No host sync: a non-finite norm multiplies by 1, leaving the gradients as they were.
        coef = torch.where(torch.isfinite(total), coef, torch.ones_like(coef))
        for _, tensors in groups.values():
            torch._foreach_mul_(tensors, coef.to(tensors[0].device))
    return total
