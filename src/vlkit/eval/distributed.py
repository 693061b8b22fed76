"""Sharded evaluation across ranks: each rank of ``group`` reads its part of the data, counts are combined with
``all_reduce`` and features gathered. Ranks step through their batches in lockstep (a rank out of data runs a
throwaway forward on a dummy input) because a model sharded with FSDP or tensor parallelism needs every rank in
every forward."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vlkit.eval.results import EvalUsageError
from vlkit.utils.modules import is_sharded


@dataclass(frozen=True)
class Shard:
    """This process's place in a sharded evaluation (rank 0 of 1 when not sharded)."""

    rank: int = 0
    world_size: int = 1
    group: Any = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_shard(distributed: bool | None = None, group: Any = None) -> Shard:
    """Shard over ``group`` (default: the world) when torch.distributed is initialised, unless ``distributed=False``.

    Raises:
        EvalUsageError: ``distributed=True`` without an initialised process group.
    """
    if distributed is False:
        return Shard()
    if not (dist.is_available() and dist.is_initialized()):
        if distributed:
            raise EvalUsageError("distributed evaluation needs an initialised torch.distributed process group")
        return Shard()
    return Shard(dist.get_rank(group), dist.get_world_size(group), group)


def comm_device(shard: Shard) -> torch.device:
    if dist.get_backend(shard.group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor, shard: Shard) -> torch.Tensor:
    """The sum of ``tensor`` over the ranks of ``shard`` (the tensor itself when not sharded)."""
    if not shard.distributed:
        return tensor
    t = tensor.to(comm_device(shard)).clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=shard.group)
    return t.to(tensor.device)


def all_gather_rows(tensor: torch.Tensor, shard: Shard) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order; the ranks may hold different row counts."""
    if not shard.distributed:
        return tensor
    dev = comm_device(shard)
    counts = all_gather_counts(tensor.shape[0], shard)
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]), device=dev)
    padded[: tensor.shape[0]] = tensor.to(dev)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded, group=shard.group)
    return torch.cat([p[:n] for p, n in zip(parts, counts)]).to(tensor.device)


def all_gather_counts(n: int, shard: Shard) -> list[int]:
    """Every rank's ``n``, in rank order."""
    if not shard.distributed:
        return [n]
    dev = comm_device(shard)
    counts = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(shard.world_size)]
    dist.all_gather(counts, torch.tensor([n], dtype=torch.long, device=dev), group=shard.group)
    return [int(c) for c in counts]


def all_gather_objects(obj: Any, shard: Shard) -> list[Any]:
    if not shard.distributed:
        return [obj]
    out: list[Any] = [None] * shard.world_size
    dist.all_gather_object(out, obj, group=shard.group)
    return out


def lockstep(batches: Iterable[dict], shard: Shard) -> Iterator[dict | None]:
    """The batches, then ``None`` until every rank has run out, so all ranks take the same number of steps.

    A ``None`` asks the caller for a throwaway forward on a dummy input: a sharded model (FSDP, tensor parallel)
    hangs unless every rank joins every forward.
    """
    if not shard.distributed:
        yield from batches
        return
    dev = comm_device(shard)
    it = iter(batches)
    while True:
        batch = next(it, None)
        more = torch.tensor([0 if batch is None else 1], device=dev)
        dist.all_reduce(more, op=dist.ReduceOp.MAX, group=shard.group)
        if not int(more):
            return
        yield batch


def refuse_lone_shard(inner: nn.Module, shard: Any) -> None:
    """A model sharded over ranks (FSDP / tensor parallel) can only be evaluated by all its ranks together."""
    if is_sharded(inner) and not shard.distributed and torch.distributed.is_initialized():
        raise EvalUsageError("the model is sharded across ranks (FSDP / tensor parallel): evaluate on every rank")
