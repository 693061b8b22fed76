"""SigLIP sigmoid loss: naive, tiled (O(tile) memory) and ring (across ranks) forms.

With logits ``l_ij = scale * <x_i, y_j> + bias`` and ``z_ij = +1`` for matching pairs (``i == j``),
``-1`` otherwise, the loss is ``-(1/N) * sum_ij log sigmoid(z_ij * l_ij)``: a sum over every pair
divided by the number of images, as in big_vision and open_clip. Since
``-log sigmoid(-l) = softplus(l)`` and ``-log sigmoid(l) = softplus(l) - l``, this equals
``(1/N) * (sum_ij softplus(l_ij) - sum_i l_ii)``, and ``dL/dl_ij = (sigmoid(l_ij) - [i == j]) / N``.

Across ranks every impl returns the global loss on every rank with the same gradient convention as
the contrastive ring loss (see :mod:`vlkit.losses.ring`): after DDP's averaging of gradients the
towers, the scale and the bias receive exactly the gradient of the single-process loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from vlkit.losses.distributed import GroupLike, all_gather_with_grad, resolve_group, shard_sizes
from vlkit.losses.ring import Ring, ring_visit, ring_visit_accumulate
from vlkit.losses.tiled import _as_scale, _positive_columns, _view, compute_dtype, tile_shape

__all__ = ["siglip_loss", "SigLipLoss", "naive_siglip_loss", "tiled_siglip_loss"]

SIGLIP_IMPLS = ("auto", "naive", "tiled", "ring")


def naive_siglip_loss(
    image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float, logit_bias: Tensor | float
) -> Tensor:
    """SigLIP loss from the full ``N x N`` logit matrix (the reference).

    Args:
        image_features: ``[N, D]``.
        text_features: ``[N, D]``; text ``i`` is the positive of image ``i``.
        logit_scale: already-exponentiated scale.
        logit_bias: additive bias.

    Returns:
        Scalar loss in float32 (float64 for float64 inputs).
    """
    cdt = compute_dtype(image_features.dtype)
    n = image_features.shape[0]
    with torch.autocast(image_features.device.type, enabled=False):
        scale = logit_scale.to(cdt).reshape(()) if isinstance(logit_scale, Tensor) else float(logit_scale)
        bias = logit_bias.to(cdt).reshape(()) if isinstance(logit_bias, Tensor) else float(logit_bias)
        logits = scale * (image_features.to(cdt) @ text_features.to(cdt).T) + bias
        signs = 2 * torch.eye(n, dtype=cdt, device=logits.device) - 1
        return -F.logsigmoid(signs * logits).sum() / max(n, 1)


@torch.no_grad()
def _block_loss(xs: Tensor, y: Tensor, bias: Tensor, pos_cols: Tensor, tile: tuple) -> Tensor:
    # sum_ij softplus(l_ij) - sum over the positives found in this block of l_ii.
    R, C = xs.shape[0], y.shape[0]
    total = xs.new_zeros(())
    if R == 0 or C == 0:
        return total
    tr, tc = tile_shape(R, C, xs.device, *tile)
    s_buf = xs.new_empty(min(tr, R) * min(tc, C))
    for r0 in range(0, R, tr):
        r1 = min(r0 + tr, R)
        for c0 in range(0, C, tc):
            c1 = min(c0 + tc, C)
            s = torch.mm(xs[r0:r1], y[c0:c1].T, out=_view(s_buf, r1 - r0, c1 - c0)).add_(bias)
            total += F.softplus(s).sum()
            cols, inside = _positive_columns(pos_cols, r0, r1, c0, c1)
            picked = s.gather(1, cols[:, None]).squeeze(1)
            total -= torch.where(inside, picked, torch.zeros_like(picked)).sum()
    return total


@torch.no_grad()
def _block_grad(xs: Tensor, y: Tensor, bias: Tensor, pos_cols: Tensor, gx: Tensor, gy: Tensor, tile: tuple) -> Tensor:
    # Unnormalised dl = sigmoid(l) - onehot(positive); gx += dl @ y, gy += dl.T @ xs; returns sum(dl).
    R, C = xs.shape[0], y.shape[0]
    dbias = xs.new_zeros(())
    if R == 0 or C == 0:
        return dbias
    tr, tc = tile_shape(R, C, xs.device, *tile)
    s_buf = xs.new_empty(min(tr, R) * min(tc, C))
    row_ids = torch.arange(min(tr, R), device=xs.device)
    for r0 in range(0, R, tr):
        r1 = min(r0 + tr, R)
        xr = xs[r0:r1]
        for c0 in range(0, C, tc):
            c1 = min(c0 + tc, C)
            yc = y[c0:c1]
            a = torch.mm(xr, yc.T, out=_view(s_buf, r1 - r0, c1 - c0)).add_(bias).sigmoid_()
            cols, inside = _positive_columns(pos_cols, r0, r1, c0, c1)
            a.index_put_((row_ids[: r1 - r0], cols), torch.where(inside, -1.0, 0.0).to(a.dtype), accumulate=True)
            dbias += a.sum()
            gx[r0:r1].addmm_(a, yc)
            gy[c0:c1].addmm_(a.T, xr)
    return dbias


def _prepare(image, scale, bias):
    cdt = compute_dtype(image.dtype)
    s = scale.detach().to(cdt).reshape(())
    x = image.detach().to(cdt)
    return cdt, s, x, x * s, bias.detach().to(cdt).reshape(())


class _TiledSigLip(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, bias, tile):
        with torch.autocast(image.device.type, enabled=False), torch.no_grad():
            cdt, _, _, xs, b = _prepare(image, scale, bias)
            n = xs.shape[0]
            pos_cols = torch.arange(n, device=xs.device)
            loss = _block_loss(xs, text.detach().to(cdt), b, pos_cols, tile) / max(n, 1)
        ctx.save_for_backward(image, text, scale, bias)
        ctx.tile = tile
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        image, text, scale, bias = ctx.saved_tensors
        need_x, need_y, need_s, need_b = ctx.needs_input_grad[:4]
        with torch.autocast(image.device.type, enabled=False), torch.no_grad():
            cdt, s, x, xs, b = _prepare(image, scale, bias)
            n = xs.shape[0]
            y = text.detach().to(cdt)
            gx, gy = torch.zeros_like(xs), torch.zeros_like(y)
            dbias = _block_grad(xs, y, b, torch.arange(n, device=xs.device), gx, gy, ctx.tile)
            g = grad_out.detach().to(cdt) / max(n, 1)
            grads = (
                (gx * (s * g)).to(image.dtype) if need_x else None,
                (gy * g).to(text.dtype) if need_y else None,
                ((x * gx).sum() * g).to(scale.dtype).reshape(scale.shape) if need_s else None,
                (dbias * g).to(bias.dtype).reshape(bias.shape) if need_b else None,
            )
        return (*grads, None)


class _RingSigLip(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, bias, group, sizes, tile):
        ring = Ring(group)
        txt_off = [sum(sizes[:r]) for r in range(ring.world)]
        n_total = sum(sizes)
        with torch.autocast(image.device.type, enabled=False), torch.no_grad():
            cdt, _, _, xs, b = _prepare(image, scale, bias)
            # Image i of this rank is global row txt_off[rank] + i; its positive is the text with that index.
            glob = torch.arange(xs.shape[0], device=xs.device) + txt_off[ring.rank]
            total = xs.new_zeros(())

            def visit(owner: int, y: Tensor) -> None:
                nonlocal total
                total = total + _block_loss(xs, y.to(cdt), b, glob - txt_off[owner], tile)

            ring_visit(text.detach(), ring, list(sizes), visit)
            dist.all_reduce(total, group=group)
            loss = total / n_total
        ctx.save_for_backward(image, text, scale, bias)
        ctx.group, ctx.sizes, ctx.tile = group, sizes, tile
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        image, text, scale, bias = ctx.saved_tensors
        need_x, need_y, need_s, need_b = ctx.needs_input_grad[:4]
        group, sizes = ctx.group, list(ctx.sizes)
        ring = Ring(group)
        txt_off = [sum(sizes[:r]) for r in range(ring.world)]
        n_total = sum(sizes)
        with torch.autocast(image.device.type, enabled=False), torch.no_grad():
            cdt, s, x, xs, b = _prepare(image, scale, bias)
            glob = torch.arange(xs.shape[0], device=xs.device) + txt_off[ring.rank]
            gx = torch.zeros_like(xs)
            dbias = xs.new_zeros(())

            def visit(owner: int, y: Tensor) -> Tensor:
                nonlocal dbias
                gy = xs.new_zeros((sizes[owner], xs.shape[1]))
                dbias = dbias + _block_grad(xs, y.to(cdt), b, glob - txt_off[owner], gx, gy, ctx.tile)
                return gy

            gy_own = ring_visit_accumulate(text.detach(), ring, sizes, visit, cdt)
            g = grad_out.detach().to(cdt).reshape(())
            totals = torch.stack([g, (x * gx).sum(), dbias])
            dist.all_reduce(totals, group=group)
            g_sum, dscale, dbias = totals[0] / n_total, totals[1] / n_total, totals[2] / n_total
            grads = (
                (gx * (s * g_sum)).to(image.dtype) if need_x else None,
                (gy_own * g_sum).to(text.dtype) if need_y else None,
                (dscale * g).to(scale.dtype).reshape(scale.shape) if need_s else None,
                (dbias * g).to(bias.dtype).reshape(bias.shape) if need_b else None,
            )
        return (*grads, None, None, None)


def tiled_siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
    *,
    tile_rows: int | None = None,
    tile_cols: int | None = None,
) -> Tensor:
    """SigLIP loss over logit tiles, recomputed in backward; memory O(tile) instead of O(N^2).

    Args:
        image_features: ``[N, D]``.
        text_features: ``[N, D]``.
        logit_scale: already-exponentiated scale.
        logit_bias: additive bias.
        tile_rows: rows per tile; chosen from the device when None.
        tile_cols: columns per tile.

    Returns:
        Scalar loss in float32 (float64 for float64 inputs).
    """
    _check_pairs(image_features, text_features)
    scale = _as_scale(logit_scale, image_features)
    bias = _as_scale(logit_bias, image_features)
    return _TiledSigLip.apply(image_features, text_features, scale, bias, (tile_rows, tile_cols))


def _check_pairs(image_features: Tensor, text_features: Tensor) -> None:
    if image_features.ndim != 2 or text_features.ndim != 2:
        raise ValueError("features must be 2-D [batch, dim]")
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image and text features must have the same shape, got {tuple(image_features.shape)} "
            f"and {tuple(text_features.shape)}"
        )


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
    *,
    impl: str = "auto",
    group: GroupLike = None,
) -> Tensor:
    """SigLIP sigmoid loss, per-image sum over all pairs, averaged over images.

    Args:
        image_features: ``[n, D]`` (this rank's shard when ``group`` is given).
        text_features: ``[n, D]``; text ``i`` pairs with image ``i``.
        logit_scale: already-exponentiated scale (tensor or float).
        logit_bias: bias (tensor or float); SigLIP initialises it at -10.
        impl: ``"naive"`` (full logits), ``"tiled"`` (recomputed tiles), ``"ring"`` (across ranks)
            or ``"auto"`` (ring with a group of size > 1, tiled otherwise).
        group: data-parallel process group, ``"world"``, or None for a single process.

    Returns:
        The loss over the concatenated batch of all ranks (identical on every rank).
    """
    if impl not in SIGLIP_IMPLS:
        raise ValueError(f"impl must be one of {SIGLIP_IMPLS}, got {impl!r}")
    _check_pairs(image_features, text_features)
    pg = resolve_group(group)
    if impl == "auto":
        impl = "ring" if pg is not None else "tiled"
    if pg is None:
        if impl == "naive":
            return naive_siglip_loss(image_features, text_features, logit_scale, logit_bias)
        return tiled_siglip_loss(image_features, text_features, logit_scale, logit_bias)
    counts = shard_sizes(pg, image_features.shape[0], device=image_features.device)
    sizes = [c[0] for c in counts]
    if impl == "ring":
        scale = _as_scale(logit_scale, image_features)
        bias = _as_scale(logit_bias, image_features)
        return _RingSigLip.apply(image_features, text_features, scale, bias, pg, tuple(sizes), (None, None))
    all_image = all_gather_with_grad(image_features, pg, sizes)
    all_text = all_gather_with_grad(text_features, pg, sizes)
    if impl == "naive":
        return naive_siglip_loss(all_image, all_text, logit_scale, logit_bias)
    return tiled_siglip_loss(all_image, all_text, logit_scale, logit_bias)


class SigLipLoss(nn.Module):
    """SigLIP loss with its learnable bias.

    Args:
        impl: see :func:`siglip_loss`.
        group: ``"world"`` (default: the default process group when initialised with > 1 ranks,
            resolved at every call), a ``ProcessGroup``, or None for a single process. The module
            never creates process groups.
        bias_init: initial bias; -10 as in the SigLIP paper, so that the many negative pairs start
            with a small loss.
    """

    def __init__(self, impl: str = "auto", group: GroupLike = "world", bias_init: float = -10.0):
        super().__init__()
        if impl not in SIGLIP_IMPLS:
            raise ValueError(f"impl must be one of {SIGLIP_IMPLS}, got {impl!r}")
        self.impl = impl
        self.group = group
        self.logit_bias = nn.Parameter(torch.full((), float(bias_init)))

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float) -> Tensor:
        """Loss for this step's features and the model's (exponentiated) logit scale."""
        return siglip_loss(
            image_features, text_features, logit_scale, self.logit_bias, impl=self.impl, group=self.group
        )

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}, bias={float(self.logit_bias.detach()):.3g}"
