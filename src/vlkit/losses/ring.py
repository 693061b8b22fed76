"""Ring contrastive loss: exact global InfoNCE across ranks with O(B_local * D) memory per rank.

Each rank keeps its image rows. Text shards travel once around the ring (``batch_isend_irecv``),
the transfer of the next shard overlapping the computation on the current one. Row LSEs accumulate
locally; every rank also keeps a partial column LSE over its own rows for every global column, and
one log-sum-exp all-reduce (max, then sum of rescaled exponentials) turns those into the exact
column LSEs. The backward runs the ring again: text shards travel with the recomputation, and the
text gradients travel one hop behind, summed on the way, until they reach their owner.

Gradient convention (the same as ``impl="naive"`` with ``gather_with_grad=True``): every rank
returns the global loss ``L``; a rank's own features receive ``(sum over ranks of the upstream
gradient) * dL/dfeatures``, i.e. ``world_size * dL/dfeatures`` when every rank calls
``loss.backward()``, and ``logit_scale`` receives ``upstream * dL/dscale`` on every rank. DDP then
averages parameter gradients over ranks, which yields exactly ``dL/dparams`` for the towers and for
the (replicated) scale.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from vlkit.losses.distributed import shard_sizes
from vlkit.losses.tiled import _as_scale, accumulated_lse, block_grad, block_lse, compute_dtype, lse_accumulator

__all__ = ["ring_contrastive_loss", "Ring", "ring_visit", "ring_visit_accumulate", "all_reduce_lse"]

_SHARD_TAG = 0
_GRAD_TAG = 1


class Ring:
    """Neighbours of this rank in a process group, and non-blocking exchanges with them."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.send_peer = dist.get_global_rank(group, (self.rank + 1) % self.world)
        self.recv_peer = dist.get_global_rank(group, (self.rank - 1) % self.world)

    def start(self, sends: list[tuple[Tensor, int]], recvs: list[tuple[Tensor, int]]) -> list:
        """Post sends to the next rank and receives from the previous one; returns the requests."""
        ops = [dist.P2POp(dist.isend, t, self.send_peer, self.group, tag) for t, tag in sends]
        ops += [dist.P2POp(dist.irecv, t, self.recv_peer, self.group, tag) for t, tag in recvs]
        return dist.batch_isend_irecv(ops) if ops else []


def _wait(works: list) -> None:
    for w in works:
        w.wait()


def ring_visit(shard: Tensor, ring: Ring, sizes: list[int], visit: Callable[[int, Tensor], None]) -> None:
    """Call ``visit(owner, shard_of_owner)`` for every rank's shard, starting with the own one.

    The next shard is received while ``visit`` runs on the current one (double buffering).

    Args:
        shard: ``[sizes[rank], ...]`` local shard.
        ring: the ring of the group.
        sizes: shard length on every rank.
        visit: called once per owner rank.
    """
    world, rank = ring.world, ring.rank
    cur = shard.contiguous()
    bufs = [cur.new_empty((max(sizes), *cur.shape[1:])) for _ in range(2)] if world > 1 else []
    for k in range(world):
        owner = (rank - k) % world
        works, nxt = [], None
        if k < world - 1:
            nxt = bufs[k % 2][: sizes[(rank - k - 1) % world]]
            works = ring.start([(cur, _SHARD_TAG)], [(nxt, _SHARD_TAG)])
        visit(owner, cur)
        _wait(works)
        if nxt is not None:
            cur = nxt


def ring_visit_accumulate(
    shard: Tensor, ring: Ring, sizes: list[int], visit: Callable[[int, Tensor], Tensor], grad_dtype: torch.dtype
) -> Tensor:
    """Like :func:`ring_visit`, but ``visit`` returns this rank's gradient for the visited shard.

    The gradient of a shard follows the shard one hop behind, each rank adding its part, and the
    sum over all ranks lands on the shard's owner.

    Args:
        shard: local shard.
        ring: the ring of the group.
        sizes: shard length on every rank.
        visit: ``visit(owner, shard) -> [sizes[owner], ...]`` gradient contribution of this rank.
        grad_dtype: dtype of the travelling gradients.

    Returns:
        The gradient of the local shard summed over all ranks.
    """
    world, rank = ring.world, ring.rank
    cur = shard.contiguous()
    feat_shape = tuple(cur.shape[1:])
    bufs = [cur.new_empty((max(sizes), *feat_shape)) for _ in range(2)] if world > 1 else []
    done = None  # this rank's finished sum for the shard visited in the previous step
    for k in range(world):
        owner = (rank - k) % world
        sends, recvs, nxt, incoming = [], [], None, None
        if k < world - 1:
            nxt = bufs[k % 2][: sizes[(rank - k - 1) % world]]
            sends.append((cur, _SHARD_TAG))
            recvs.append((nxt, _SHARD_TAG))
        if done is not None:
            # The previous rank visited this step's shard one step ago; its running sum arrives now.
            incoming = torch.empty((sizes[owner], *feat_shape), dtype=grad_dtype, device=cur.device)
            sends.append((done, _GRAD_TAG))
            recvs.append((incoming, _GRAD_TAG))
        works = ring.start(sends, recvs)
        part = visit(owner, cur)
        _wait(works)
        if incoming is not None:
            part += incoming
        done = part
        if nxt is not None:
            cur = nxt
    if world == 1:
        return done
    own = torch.empty((sizes[rank], *feat_shape), dtype=grad_dtype, device=cur.device)
    _wait(ring.start([(done, _GRAD_TAG)], [(own, _GRAD_TAG)]))
    return own


def all_reduce_lse(partial: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Log-sum-exp across ranks of per-rank partial LSEs, stable for any magnitude.

    Args:
        partial: per-rank LSE over this rank's terms (``-inf`` where it has none).
        group: process group.

    Returns:
        The LSE over all ranks' terms, identical on every rank.
    """
    top = partial.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = (partial - top).exp_()
    dist.all_reduce(total, group=group)
    return total.log_().add_(top)


def _block_positives(labels: Tensor, lo: int, n: int) -> Tensor:
    rel = labels - lo
    return torch.where((rel >= 0) & (rel < n), rel, torch.full_like(rel, -1))


class _RingContrastive(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, labels, group, sizes, uniform_labels, tile):
        ring = Ring(group)
        img_sizes, txt_sizes = sizes
        txt_off = [sum(txt_sizes[:r]) for r in range(ring.world)]
        n_total = sum(img_sizes)
        cdt = compute_dtype(image.dtype)
        with torch.autocast(image.device.type, enabled=False), torch.no_grad():
            s = scale.detach().to(cdt).reshape(())
            xs = image.detach().to(cdt) * s
            row_acc = lse_accumulator(xs.shape[0], xs)
            # This rank's partial column sums, over its own rows, for every column of the global batch.
            col_acc = lse_accumulator(sum(txt_sizes), xs)
            pos = xs.new_zeros(xs.shape[0])

            def visit(owner: int, y: Tensor) -> None:
                lo, n = txt_off[owner], txt_sizes[owner]
                cols = (col_acc[0][lo : lo + n], col_acc[1][lo : lo + n])
                block_lse(xs, y.to(cdt), row_acc, cols, pos, _block_positives(labels, lo, n), tile)

            ring_visit(text.detach(), ring, txt_sizes, visit)
            row_lse = accumulated_lse(row_acc)
            col_lse = all_reduce_lse(accumulated_lse(col_acc), group)
            w = 1.0 / (2 * n_total)
            loss = (w * (row_lse - pos).sum() + w * (col_lse[labels] - pos).sum()).reshape(())
            dist.all_reduce(loss, group=group)
        ctx.save_for_backward(image, text, scale, labels, row_lse, col_lse)
        ctx.group, ctx.sizes, ctx.uniform, ctx.tile = group, sizes, uniform_labels, tile
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        image, text, scale, labels, row_lse, col_lse = ctx.saved_tensors
        group = ctx.group
        ring = Ring(group)
        img_sizes, txt_sizes = ctx.sizes
        txt_off = [sum(txt_sizes[:r]) for r in range(ring.world)]
        n_total = sum(img_sizes)
        cdt = compute_dtype(image.dtype)
        need_x, need_y, need_s = ctx.needs_input_grad[:3]
        with torch.autocast(image.device.type, enabled=False), torch.no_grad():
            s = scale.detach().to(cdt).reshape(())
            x = image.detach().to(cdt)
            xs = x * s
            # Both terms carry the weight 1/(2N); it is applied once, to the accumulated results.
            w = 1.0 / (2 * n_total)
            col_shift = col_lse
            if not ctx.uniform:
                # A text that is the positive of k images enters the text->image sum k times.
                counts = torch.bincount(labels, minlength=col_lse.shape[0]).to(cdt)
                dist.all_reduce(counts, group=group)
                col_shift = col_lse - torch.log(counts)
            gx = torch.zeros_like(xs)

            def visit(owner: int, y: Tensor) -> Tensor:
                lo, n = txt_off[owner], txt_sizes[owner]
                gy = xs.new_zeros((n, xs.shape[1]))
                block_grad(
                    xs, y.to(cdt), row_lse, col_shift[lo : lo + n], _block_positives(labels, lo, n), 2.0, gx, gy,
                    ctx.tile,
                )  # fmt: skip
                return gy

            # Every rank must take part in the ring even when its own features need no gradient.
            gy_own = ring_visit_accumulate(text.detach(), ring, txt_sizes, visit, cdt)
            g = grad_out.detach().to(cdt).reshape(())
            # One collective for both: the sum of upstream gradients over ranks, and d L / d scale.
            totals = torch.stack([g, (x * gx).sum()])
            dist.all_reduce(totals, group=group)
            # gx and the text gradients hold dS / w.
            g_sum, dscale = totals[0] * w, totals[1] * w
            grad_x = (gx * (s * g_sum)).to(image.dtype) if need_x else None
            grad_y = (gy_own * g_sum).to(text.dtype) if need_y else None
            grad_s = (dscale * g).to(scale.dtype).reshape(scale.shape) if need_s else None
        return grad_x, grad_y, grad_s, None, None, None, None, None


def ring_contrastive_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    group: dist.ProcessGroup,
    labels: Tensor | None = None,
    *,
    tile_rows: int | None = None,
    tile_cols: int | None = None,
) -> Tensor:
    """Exact global contrastive loss over the concatenated batch of all ranks in ``group``.

    Every rank of ``group`` must call this with its own shard and later run backward on the result.
    See the module docstring for the gradient convention (equivalent, after DDP's gradient
    averaging, to the single-process loss on the concatenated batch).

    Args:
        image_features: ``[n_rank, D]`` this rank's image features (shard sizes may differ by rank).
        text_features: ``[m_rank, D]`` this rank's text features.
        logit_scale: already-exponentiated scale (same value on every rank).
        group: process group of the data-parallel ranks.
        labels: ``[n_rank]`` global index (into the concatenated texts) of each local image's
            positive text; by default the image's own global index.
        tile_rows: rows per tile of the local block computation.
        tile_cols: columns per tile.

    Returns:
        The global loss (scalar, identical on every rank).
    """
    shard_counts = shard_sizes(group, image_features.shape[0], text_features.shape[0], device=image_features.device)
    img_sizes = [c[0] for c in shard_counts]
    txt_sizes = [c[1] for c in shard_counts]
    rank = dist.get_rank(group)
    uniform = labels is None
    if labels is None:
        if sum(img_sizes) != sum(txt_sizes):
            raise ValueError(f"default labels need as many texts as images, got {sum(txt_sizes)} and {sum(img_sizes)}")
        start = sum(img_sizes[:rank])
        labels = torch.arange(start, start + image_features.shape[0], device=image_features.device)
    ring_sizes = (tuple(img_sizes), tuple(txt_sizes))
    scale = _as_scale(logit_scale, image_features)
    return _RingContrastive.apply(
        image_features, text_features, scale, labels.to(torch.long), group, ring_sizes, uniform, (tile_rows, tile_cols)
    )
