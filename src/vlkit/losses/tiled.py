"""Exact contrastive (InfoNCE) loss over tiles of the logit matrix, in pure PyTorch.

The forward pass visits every tile of ``S = scale * X @ Y.T`` once and keeps only the row and column
log-sum-exp of ``S``; the backward pass recomputes each tile once. Peak extra memory is a few tiles
(``O(tile_rows * tile_cols)``) plus ``O(N + M)`` vectors instead of the ``O(N * M)`` logits.

The block primitives (:func:`block_lse`, :func:`block_grad`) are shared with the ring loss, which
runs them on the blocks that arrive from other ranks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "tiled_contrastive_loss",
    "block_lse",
    "block_grad",
    "lse_accumulator",
    "accumulated_lse",
    "tile_shape",
    "compute_dtype",
]

# Elements per logit tile. CPU wants tiles that stay near the last-level cache while the matmul is
# still large enough to run at full speed; GPUs want fewer, larger launches.
_TILE_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 24}
_DEFAULT_TILE_ELEMENTS = 1 << 22
# Keep at least this many rows per tile so the matmul stays efficient when the batch is huge.
_MIN_TILE_ROWS = 128
# The one-exponential forward checks its own exactness with a host sync, which costs nothing on the CPU
# and stalls a GPU queue; elsewhere the two-exponential forward runs. Tests switch this off to cover it.
_ONE_EXP_DEVICES = ("cpu",)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the logits are formed in: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tile_shape(
    rows: int, cols: int, device: torch.device, tile_rows: int | None = None, tile_cols: int | None = None
) -> tuple[int, int]:
    """Choose a (rows, cols) tile for a ``rows x cols`` logit block.

    Full-width tiles are preferred: each tile then yields exact row LSEs and the column merge is the
    only online rescaling. Columns are split only when a full row band would exceed the budget even
    at the minimum row count.
    """
    budget = _TILE_ELEMENTS.get(device.type, _DEFAULT_TILE_ELEMENTS)
    tc = tile_cols if tile_cols is not None else min(cols, max(1, budget // _MIN_TILE_ROWS))
    tc = max(1, min(tc, cols)) if cols > 0 else 1
    tr = tile_rows if tile_rows is not None else max(1, budget // tc)
    tr = max(1, min(tr, rows)) if rows > 0 else 1
    return tr, tc


def _tile_sums(s: Tensor, dim: int, scratch: Tensor) -> tuple[Tensor, Tensor]:
    # (max, sum of exp(s - max)) along dim, through a reused scratch tile.
    m = s.amax(dim, keepdim=True)
    total = torch.sub(s, m, out=scratch).exp_().sum(dim)
    return m.squeeze(dim), total


def _merge(ref: Tensor, total: Tensor, tile_ref: Tensor, tile_total: Tensor) -> None:
    # Online softmax normaliser: keep (reference, sum of exp(x - reference)) and rescale to the larger
    # reference. The sum stays in [~1, n], so the large logits are rounded once, when the LSE is read.
    top = torch.maximum(ref, tile_ref)
    total.mul_((ref - top).exp_()).add_(tile_total * (tile_ref - top).exp_())
    ref.copy_(top)


def _view(buf: Tensor, r: int, c: int) -> Tensor:
    return buf[: r * c].view(r, c)


def _positive_columns(pos_cols: Tensor | None, r0: int, r1: int, c0: int, c1: int) -> tuple[Tensor, Tensor] | None:
    if pos_cols is None:
        return None
    pc = pos_cols[r0:r1] - c0
    inside = (pc >= 0) & (pc < c1 - c0)
    return pc.clamp(0, c1 - c0 - 1), inside


def lse_accumulator(n: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """Empty running log-sum-exp for ``n`` entries: ``(reference, sum of exp(x - reference))``."""
    return like.new_full((n,), -math.inf), like.new_zeros(n)


def accumulated_lse(acc: tuple[Tensor, Tensor]) -> Tensor:
    """Read the log-sum-exp out of an accumulator made by :func:`lse_accumulator`."""
    ref, total = acc
    return total.log().add_(ref)


@torch.no_grad()
def block_lse(
    xs: Tensor,
    y: Tensor,
    row_acc: tuple[Tensor, Tensor] | None,
    col_acc: tuple[Tensor, Tensor] | None,
    pos: Tensor | None = None,
    pos_cols: Tensor | None = None,
    tile: tuple[int | None, int | None] | None = None,
) -> None:
    """Merge the row/column log-sum-exp of the block ``xs @ y.T`` into running accumulators.

    Accumulators hold ``(reference, sum of exp(x - reference))`` (see :func:`lse_accumulator`) so
    that the large logits are rounded once, when the LSE is finally read, however many tiles and
    blocks are merged.

    Args:
        xs: ``[R, D]`` rows, already multiplied by the logit scale, in the compute dtype.
        y: ``[C, D]`` columns in the compute dtype.
        row_acc: accumulator over the ``R`` rows, or None to skip rows.
        col_acc: accumulator over the ``C`` columns, or None to skip columns.
        pos: ``[R]`` accumulator receiving the logit of each row's positive column when it lies here.
        pos_cols: ``[R]`` column (relative to this block) of each row's positive, or ``-1``.
        tile: ``(tile_rows, tile_cols)``; either (or the pair) None to choose from the device.
    """
    R, C = xs.shape[0], y.shape[0]
    if R == 0 or C == 0:
        return
    tr, tc = tile_shape(R, C, xs.device, *(tile or (None, None)))
    one_exp = xs.device.type in _ONE_EXP_DEVICES and row_acc is not None and col_acc is not None
    s_buf = xs.new_empty(min(tr, R) * min(tc, C))
    e_buf = torch.empty_like(s_buf)
    for r0 in range(0, R, tr):
        r1 = min(r0 + tr, R)
        xr = xs[r0:r1]
        for c0 in range(0, C, tc):
            c1 = min(c0 + tc, C)
            s = torch.mm(xr, y[c0:c1].T, out=_view(s_buf, r1 - r0, c1 - c0))
            e = _view(e_buf, r1 - r0, c1 - c0)
            if one_exp:
                tile_row, tile_col = _tile_sums_both(s, e)
            else:
                tile_row = _tile_sums(s, 1, e) if row_acc is not None else None
                tile_col = _tile_sums(s, 0, e) if col_acc is not None else None
            if tile_row is not None:
                _merge(row_acc[0][r0:r1], row_acc[1][r0:r1], *tile_row)
            if tile_col is not None:
                _merge(col_acc[0][c0:c1], col_acc[1][c0:c1], *tile_col)
            sel = _positive_columns(pos_cols, r0, r1, c0, c1)
            if pos is not None and sel is not None:
                cols, inside = sel
                picked = s.gather(1, cols[:, None]).squeeze(1)
                pos[r0:r1] += torch.where(inside, picked, torch.zeros_like(picked))


# exp(-40): a column whose row-weighted sum falls below this may have lost its largest terms to
# underflow (its maximum sits > 40 below the tile maximum) and is recomputed with its own shift.
_UNDERFLOW_GUARD = math.exp(-40.0)


def _tile_sums_both(s: Tensor, scratch: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    # Row and column sums from one exponential: E = exp(S - rowmax) gives the row sums, and the
    # column sums relative to the tile maximum are sum_i E_ij * exp(rowmax_i - max) -- a
    # matrix-vector product instead of a second exponential pass. Each product is exact whenever the
    # true term exp(S_ij - max) is representable, so only columns lying entirely far below the tile
    # maximum need a second look.
    m = s.amax(1, keepdim=True)
    e = torch.sub(s, m, out=scratch).exp_()
    m = m.squeeze(1)
    row_sum = e.sum(1)
    top = m.max()
    col_sum = torch.mv(e.T, (m - top).exp_())
    col_ref = top.expand(s.shape[1]).clone()
    bad = (col_sum < _UNDERFLOW_GUARD).nonzero().squeeze(1)
    if bad.numel():
        sub = s[:, bad]
        sub_max = sub.amax(0)
        col_ref[bad] = sub_max
        col_sum[bad] = (sub - sub_max).exp_().sum(0)
    return (m, row_sum), (col_ref, col_sum)


@torch.no_grad()
def block_grad(
    xs: Tensor,
    y: Tensor,
    row_shift: Tensor | None,
    col_shift: Tensor | None,
    pos_cols: Tensor | None,
    pos_weight: float,
    gx: Tensor,
    gy: Tensor | None,
    tile: tuple[int, int] | None = None,
) -> None:
    """Accumulate the gradients of one logit block from recomputed tiles.

    With ``S = xs @ y.T`` this accumulates, up to a common weight ``w`` the caller applies to the
    results, ``dS / w = exp(S - row_shift[:, None]) + exp(S - col_shift[None, :]) - pos_weight * onehot``.
    Shifts are the LSEs minus the log of a term's weight relative to ``w``; keeping ``w`` itself out
    of them matters: adding ``log w`` to a shift near 100 would round it by ulp(100) = 7.6e-6 and
    spoil exact cancellations (for B = 1 the gradient must be exactly zero). An infinite shift
    removes that term for a row or column.

    Args:
        xs: ``[R, D]`` scaled rows (compute dtype).
        y: ``[C, D]`` columns (compute dtype).
        row_shift: ``[R]`` or None.
        col_shift: ``[C]`` or None.
        pos_cols: ``[R]`` positive column per row relative to this block, ``-1`` when not in the block.
        pos_weight: weight of the one-hot positive term.
        gx: ``[R, D]`` accumulator, receives ``dS @ y`` (multiply by the scale for d xs).
        gy: ``[C, D]`` accumulator, receives ``dS.T @ xs``; None to skip.
        tile: ``(tile_rows, tile_cols)``; either (or the pair) None to choose from the device.
    """
    R, C = xs.shape[0], y.shape[0]
    if R == 0 or C == 0:
        return
    tr, tc = tile_shape(R, C, xs.device, *(tile or (None, None)))
    both = row_shift is not None and col_shift is not None
    s_buf = xs.new_empty(min(tr, R) * min(tc, C))
    a_buf = torch.empty_like(s_buf)
    row_ids = torch.arange(min(tr, R), device=xs.device)
    for r0 in range(0, R, tr):
        r1 = min(r0 + tr, R)
        xr = xs[r0:r1]
        rs = row_shift[r0:r1] if row_shift is not None else None
        for c0 in range(0, C, tc):
            c1 = min(c0 + tc, C)
            yc = y[c0:c1]
            cs = col_shift[c0:c1] if col_shift is not None else None
            s = torch.mm(xr, yc.T, out=_view(s_buf, r1 - r0, c1 - c0))
            # Two exponentials per element: deriving one from the other (a rank-one rescaling) measured no
            # faster on the CPU and rounds a dominant column's softmax, whose gradient cancels against the
            # positive term, a few ulp further from exact.
            if both:
                a = torch.sub(s, rs[:, None], out=_view(a_buf, r1 - r0, c1 - c0)).exp_()
                a.add_(s.sub_(cs[None, :]).exp_())
            elif rs is not None:
                a = s.sub_(rs[:, None]).exp_()
            else:
                a = s.sub_(cs[None, :]).exp_()
            sel = _positive_columns(pos_cols, r0, r1, c0, c1)
            if sel is not None:
                cols, inside = sel
                delta = torch.where(inside, -pos_weight, 0.0).to(a.dtype)
                a.index_put_((row_ids[: r1 - r0], cols), delta, accumulate=True)
            gx[r0:r1].addmm_(a, yc)
            if gy is not None:
                gy[c0:c1].addmm_(a.T, xr)


def _as_scale(logit_scale: Tensor | float, like: Tensor) -> Tensor:
    if isinstance(logit_scale, Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must hold one value, got shape {tuple(logit_scale.shape)}")
        return logit_scale
    return torch.tensor(float(logit_scale), device=like.device, dtype=compute_dtype(like.dtype))


class _TiledContrastive(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, labels, row_weight, col_weight, tile):
        cdt = compute_dtype(image.dtype)
        with torch.autocast(image.device.type, enabled=False), torch.no_grad():
            s = scale.detach().to(cdt).reshape(())
            xs = image.detach().to(cdt) * s
            y = text.detach().to(cdt)
            N, M = xs.shape[0], y.shape[0]
            tile = tile_shape(N, M, xs.device, *tile)
            row_acc = lse_accumulator(N, xs) if row_weight > 0 else None
            col_acc = lse_accumulator(M, xs) if col_weight > 0 else None
            pos = xs.new_zeros(N)
            block_lse(xs, y, row_acc, col_acc, pos, labels, tile)
            row_lse = accumulated_lse(row_acc) if row_acc is not None else None
            col_lse = accumulated_lse(col_acc) if col_acc is not None else None
            valid = labels >= 0
            zero = xs.new_zeros(())
            loss = xs.new_zeros(())
            if row_lse is not None:
                loss = loss + row_weight * torch.where(valid, row_lse - pos, zero).sum()
            if col_lse is not None:
                loss = loss + col_weight * torch.where(valid, col_lse[labels.clamp(min=0)] - pos, zero).sum()
        ctx.save_for_backward(image, text, scale, labels, row_lse, col_lse)
        ctx.weights = (row_weight, col_weight)
        ctx.tile = tile
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        image, text, scale, labels, row_lse, col_lse = ctx.saved_tensors
        row_weight, col_weight = ctx.weights
        need_x, need_y, need_s = ctx.needs_input_grad[:3]
        cdt = compute_dtype(image.dtype)
        with torch.autocast(image.device.type, enabled=False), torch.no_grad():
            s = scale.detach().to(cdt).reshape(())
            x = image.detach().to(cdt)
            xs = x * s
            y = text.detach().to(cdt)
            valid = labels >= 0
            # Everything is accumulated relative to one weight and scaled once at the end.
            w = row_weight if row_weight > 0 else col_weight
            row_shift = col_shift = None
            if row_lse is not None:
                # Rows without a positive pair take no part in the image->text term.
                row_shift = torch.where(valid, row_lse, math.inf)
            if col_lse is not None:
                # A column is the target of `count` pairs, so its softmax enters `count` times.
                counts = torch.bincount(labels[valid], minlength=y.shape[0]).to(cdt)
                col_shift = col_lse - torch.log(counts * (col_weight / w))
            gx = torch.zeros_like(xs)
            gy = torch.zeros_like(y) if need_y else None
            block_grad(xs, y, row_shift, col_shift, labels, (row_weight + col_weight) / w, gx, gy, ctx.tile)
            g = grad_out.to(cdt) * w
            grad_x = (gx * (s * g)).to(image.dtype) if need_x else None
            grad_y = (gy * g).to(text.dtype) if need_y else None
            # d loss / d scale = sum_ij dS_ij <x_i, y_j> = sum_i <x_i, (dS @ Y)_i>; no division by the scale.
            grad_s = ((x * gx).sum() * g).to(scale.dtype).reshape(scale.shape) if need_s else None
        return grad_x, grad_y, grad_s, None, None, None, None


def tiled_contrastive_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    labels: Tensor | None = None,
    *,
    row_weight: float | None = None,
    col_weight: float | None = None,
    tile_rows: int | None = None,
    tile_cols: int | None = None,
) -> Tensor:
    """Exact bidirectional contrastive loss without materialising the logit matrix.

    With ``S = logit_scale * image_features @ text_features.T`` (``N x M``) and positive pairs
    ``(i, labels[i])`` the loss is
    ``row_weight * sum_i (lse_j S_ij - S_i,l_i) + col_weight * sum_i (lse_k S_k,l_i - S_i,l_i)``.
    The defaults ``row_weight = col_weight = 1 / (2N)`` give the CLIP loss, the mean of the
    image->text and text->image cross-entropies. Rows whose label is negative are ignored.

    Args:
        image_features: ``[N, D]`` features (any float dtype; half types accumulate in float32).
        text_features: ``[M, D]`` features.
        logit_scale: the already-exponentiated scale (tensor with one element, or a float).
        labels: ``[N]`` long, the text index paired with each image; ``arange(N)`` when None.
        row_weight: weight of the image->text term; ``1 / (2N)`` when None.
        col_weight: weight of the text->image term; ``1 / (2N)`` when None.
        tile_rows: rows per tile; chosen from the device when None.
        tile_cols: columns per tile; chosen from the device when None.

    Returns:
        Scalar loss in float32 (float64 for float64 inputs).
    """
    N, M = image_features.shape[0], text_features.shape[0]
    if labels is None:
        if N != M:
            raise ValueError(f"default labels need as many texts as images, got {N} and {M}")
        labels = torch.arange(N, device=image_features.device)
    scale = _as_scale(logit_scale, image_features)
    w_default = 1.0 / (2 * max(N, 1))
    rw = w_default if row_weight is None else float(row_weight)
    cw = w_default if col_weight is None else float(col_weight)
    return _TiledContrastive.apply(
        image_features, text_features, scale, labels.to(torch.long), rw, cw, (tile_rows, tile_cols)
    )
