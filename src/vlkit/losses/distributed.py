"""Process-group helpers for the contrastive losses: group resolution, shard sizes and feature gathering.

Gathering follows open_clip's ``gather_features`` semantics so that ``impl="naive"`` with a group
reproduces open_clip's ``ClipLoss`` exactly, including ``local_loss`` and ``gather_with_grad``.
Shards may have different sizes on different ranks (the last batch of an epoch, for instance).
"""

from __future__ import annotations

from typing import Union

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "GroupLike",
    "resolve_group",
    "shard_sizes",
    "all_gather_with_grad",
    "all_gather_no_grad",
    "gather_features",
]

# A process group, None for a single process, or "world" for the default group when one is initialised.
GroupLike = Union["dist.ProcessGroup", str, None]


def resolve_group(group: GroupLike) -> dist.ProcessGroup | None:
    """Turn a group argument into a process group of size > 1, or None when there is nothing to distribute.

    Args:
        group: a ``ProcessGroup``; ``"world"`` for the default group if ``torch.distributed`` is
            initialised; or None.

    Returns:
        The group, or None when it is None, has a single rank, or ``"world"`` is not initialised.
    """
    if group is None:
        return None
    if isinstance(group, str):
        if group != "world":
            raise ValueError(f"group must be a ProcessGroup, 'world' or None, got {group!r}")
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = dist.group.WORLD
    if dist.get_world_size(group) <= 1:
        return None
    return group


def shard_sizes(group: dist.ProcessGroup, *counts: int, device: torch.device) -> list[list[int]]:
    """All-gather a few integers from every rank.

    Args:
        group: the process group.
        *counts: integers contributed by this rank (e.g. image rows, text rows).
        device: device for the collective (must suit the backend).

    Returns:
        One list per rank, in rank order, each holding that rank's ``counts``.
    """
    world = dist.get_world_size(group)
    mine = torch.tensor(counts, dtype=torch.long, device=device)
    out = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(out, mine, group=group)
    return [o.tolist() for o in out]


def _gather_padded(t: Tensor, group: dist.ProcessGroup, sizes: list[int]) -> list[Tensor]:
    # all_gather needs equal shapes; pad to the largest shard and cut back.
    biggest = max(sizes)
    t = t.contiguous()
    if t.shape[0] != biggest:
        padded = t.new_zeros((biggest, *t.shape[1:]))
        padded[: t.shape[0]] = t
        t = padded
    parts = [torch.empty_like(t) for _ in sizes]
    dist.all_gather(parts, t, group=group)
    return [p[:n] for p, n in zip(parts, sizes)]


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group, sizes):
        ctx.group, ctx.sizes = group, sizes
        ctx.rank = dist.get_rank(group)
        return torch.cat(_gather_padded(t.detach(), group, list(sizes)), dim=0)

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss depends on every shard: the shard's gradient is the sum over ranks of
        # the gradient its owner slot received there.
        rank, sizes = ctx.rank, ctx.sizes
        start = sum(sizes[:rank])
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == "nccl" and len(set(sizes)) == 1:
            out = grad.new_empty((sizes[rank], *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
            return out, None, None
        total = grad.clone()
        dist.all_reduce(total, group=ctx.group)
        return total[start : start + sizes[rank]], None, None


def all_gather_with_grad(t: Tensor, group: dist.ProcessGroup, sizes: list[int]) -> Tensor:
    """Concatenate every rank's shard, with gradients flowing back to every owner.

    The backward sums, over ranks, the gradient each rank computed for a shard and returns it to
    the shard's owner (the adjoint of all-gather), like ``torch.distributed.nn.functional.all_gather``.

    Args:
        t: ``[n_rank, ...]`` local shard.
        group: process group.
        sizes: shard length on every rank.

    Returns:
        ``[sum(sizes), ...]`` tensor.
    """
    return _AllGatherWithGrad.apply(t, group, tuple(sizes))


def all_gather_no_grad(t: Tensor, group: dist.ProcessGroup, sizes: list[int], keep_local: bool = False) -> Tensor:
    """Concatenate every rank's shard without autograd through other ranks' shards.

    Args:
        t: local shard.
        group: process group.
        sizes: shard length on every rank.
        keep_local: put ``t`` itself (with its autograd history) in this rank's slot so that local
            gradients still flow, as open_clip does for ``gather_with_grad=False, local_loss=False``.

    Returns:
        ``[sum(sizes), ...]`` tensor.
    """
    parts = _gather_padded(t.detach(), group, sizes)
    if keep_local:
        parts[dist.get_rank(group)] = t
    return torch.cat(parts, dim=0)


def gather_features(
    image_features: Tensor,
    text_features: Tensor,
    group: dist.ProcessGroup,
    image_sizes: list[int],
    text_sizes: list[int],
    *,
    local_loss: bool,
    gather_with_grad: bool,
) -> tuple[Tensor, Tensor]:
    """Gather both feature shards across ``group`` with open_clip's semantics.

    ``gather_with_grad=True``: autograd all-gather, every rank's features receive gradients from
    every rank's loss. ``gather_with_grad=False``: plain all-gather; when ``local_loss`` is False the
    local shard keeps its autograd history in its own slot, when True no gathered slot does
    (the local rows are used directly by the caller).

    Args:
        image_features: ``[n, D]`` local image features.
        text_features: ``[m, D]`` local text features.
        group: process group.
        image_sizes: image shard length on every rank.
        text_sizes: text shard length on every rank.
        local_loss: whether the caller uses only local rows against all columns.
        gather_with_grad: whether gradients flow through the gather.

    Returns:
        ``(all_image_features, all_text_features)``.
    """
    if gather_with_grad:
        return (
            all_gather_with_grad(image_features, group, image_sizes),
            all_gather_with_grad(text_features, group, text_sizes),
        )
    keep = not local_loss
    return (
        all_gather_no_grad(image_features, group, image_sizes, keep_local=keep),
        all_gather_no_grad(text_features, group, text_sizes, keep_local=keep),
    )
