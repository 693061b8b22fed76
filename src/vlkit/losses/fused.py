"""Fused (Triton) bidirectional CLIP loss: exact, O((N + M) D) memory, logits recomputed once in backward.

With ``S = logit_scale * X @ Y.T`` (``X`` the ``N`` image features, ``Y`` the ``M`` text features) and positive
pairs ``(i, t_i)``, ``t_i = labels[i]`` (default ``i``, which needs ``N == M``):

    loss = 1/(2N) * sum_{i: t_i >= 0} [ (lse_row(S)_i - S_{i,t_i}) + (lse_col(S)_{t_i} - S_{i,t_i}) ]

i.e. the mean of the image->text and text->image cross-entropies: column ``t_i`` targets row ``i``, and rows with a
negative label are ignored (as in :func:`vlkit.losses.naive.naive_contrastive_loss`).

Design (``8 N M D`` FLOPs in all, the floor for an exact loss that does not store ``S``):

* Forward (``2 N M D``): a grid of ``128 x 128`` logit tiles. Each tile emits its row and column ``(max, sum exp)``
  partials (no second pass over ``S`` for the columns) and, where it holds them, the target logits; tiles whose
  logits span < 100 (log2 units) use one exponential for both directions. Rows go in panels so the partial buffers
  stay <= 128 MiB; a small kernel merges partials.
* Backward (``6 N M D``): ``S`` is recomputed once per ``8192 x 8192`` block by a kernel that writes
  ``dS = s g/(2N) (P_row + P_col - 2 onehot)`` in the feature dtype into a block buffer, plus the block's share of
  ``d logit_scale = g/(2N) sum (P_row + P_col - 2 onehot) <x, y>``; two GEMMs then accumulate ``dX += dS @ Y_q`` and
  ``dY += dS^T @ X_p`` in fp32 (cuBLAS, or a Triton GEMM). A single kernel holding a ``[BM, D]`` ``dX`` accumulator
  does not fit the register file at ``D = 512`` and would need ``N M D / BM`` fp32 atomics for ``dY``; the ``dS``
  round trip through HBM costs 6 bytes per logit against ~3000 FLOPs, comfortably compute-bound.

Extra memory at ``N = M = 65536, D = 512``, bf16: dS block 128 MiB + fp32 dY accumulator 128 MiB + fp32 dX block
accumulator 16 MiB (+16 MiB of GEMM output when cuBLAS cannot accumulate in place); the forward's <= 128 MiB of
partials are freed before the backward.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch

__all__ = ["FusedPlan", "fused_available", "fused_contrastive_loss"]

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Budgets that bound the extra memory independently of the batch (see the module docstring).
_FWD_PARTIAL_FLOATS = 1 << 25  # 128 MiB of fp32 row + column partials per forward launch
_BWD_BLOCK_BYTES = 128 << 20  # the dS block buffer
_BWD_BLOCK = 8192


@dataclass(frozen=True)
class FusedPlan:
    """How the fused loss splits the work; the defaults (``None``/``"auto"``) are what production uses.

    Attributes:
        fwd_rows: Rows of ``S`` per forward launch (rounded to the tile). ``None``: as many as the partial-buffer
            budget allows.
        bwd_rows: Rows of each backward ``dS`` block. ``None``: 8192.
        bwd_cols: Columns of each backward ``dS`` block. ``None``: as ``bwd_rows``, capped by the 128 MiB block
            budget.
        gemm: ``"cublas"`` (torch matmuls accumulating in fp32), ``"triton"`` (the Triton accumulate-GEMM) or
            ``"auto"`` (cuBLAS on CUDA, Triton in the interpreter; overridable with ``VLKIT_FUSED_GEMM``).
    """

    fwd_rows: int | None = None
    bwd_rows: int | None = None
    bwd_cols: int | None = None
    gemm: str = "auto"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fused_available(device: torch.device | str) -> bool:
    """Whether :func:`fused_contrastive_loss` can run on ``device``.

    True on CUDA when Triton imports, and on the CPU when Triton runs in interpreter mode (``TRITON_INTERPRET=1``
    set before Triton was first imported), which is how the kernels are tested without a GPU.

    Args:
        device: The device the features live on.

    Returns:
        True when the Triton kernels can be launched for tensors on ``device``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available() or _interpreting():
            return False
    elif device.type != "cpu" or not _interpreting():
        return False
    try:
        from vlkit.losses import _fused_kernels as k
    except Exception:  # noqa: BLE001 - a broken Triton install is as good as none
        return False
    # The kernels were decorated when the module was first imported; that mode must match the device.
    return (device.type == "cpu") == k.INTERPRET


def _kernels():
    from vlkit.losses import _fused_kernels

    return _fused_kernels


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _flags(x: torch.Tensor, D: int, block_k: int) -> dict:
    k = _kernels()
    return {
        "EVEN_K": D % block_k == 0,
        "IEEE": x.dtype == torch.float32,
        "UPCAST": k.INTERPRET and x.dtype == torch.bfloat16,
    }


def _forward_stats(x, y, scale, labels, plan: FusedPlan):
    """Row and column ``(max, log2 sum 2^(z - max))`` of ``z = S * log2(e)`` and the target logits ``z[i, t_i]``."""
    k = _kernels()
    (N, D), M = x.shape, y.shape[0]
    dev, f32 = x.device, torch.float32
    has_labels = labels is not None
    # Zeros, not empty: rows with a negative label never get a target logit (and are masked out of the loss).
    zt = torch.zeros(N, device=dev, dtype=f32)
    tgt = labels if has_labels else zt  # a dummy pointer when HAS_LABELS is False

    def panel_rows(bm: int, bn: int) -> int:
        if plan.fwd_rows is None:
            # Two floats per partial: 2 * ((rows / bm) * M + (M / bn) * rows) <= budget.
            rows = int(_FWD_PARTIAL_FLOATS / (2 * (M / bm + M / bn)))
        else:
            rows = plan.fwd_rows
        return min(max(bm, rows // bm * bm), _round_up(N, bm))

    def launch(meta: dict, r0: int, nr: int, rp: torch.Tensor, cp: torch.Tensor, zt_out: torch.Tensor) -> None:
        bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
        k.fwd_kernel[(_cdiv(nr, bm) * _cdiv(M, bn),)](
            x[r0:],
            y,
            scale,
            tgt[r0:],
            rp[0],
            rp[1],
            cp[0],
            cp[1],
            zt_out[r0:],
            r0,
            nr,
            M,
            D,
            x.stride(0),
            y.stride(0),
            rp.stride(1),
            cp.stride(1),
            HAS_LABELS=has_labels,
            **_flags(x, D, meta["BLOCK_K"]),
            **meta,
        )

    def partials(meta: dict, nr: int) -> tuple[torch.Tensor, torch.Tensor]:
        bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
        rp = torch.empty(2, _cdiv(M, bn), nr, device=dev, dtype=f32)
        cp = torch.empty(2, _cdiv(nr, bm), M, device=dev, dtype=f32)
        return rp, cp

    def trial(meta: dict) -> None:
        nr = min(panel_rows(meta["BLOCK_M"], meta["BLOCK_N"]), N)
        launch(meta, 0, nr, *partials(meta, nr), torch.empty_like(zt))

    key = (x.dtype, D, has_labels, N >= 8192 and M >= 8192)
    meta = k.choose("fwd", key, k.candidates("fwd", x.element_size()), trial)
    bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
    rows = panel_rows(bm, bn)
    row_part, col_part = partials(meta, min(rows, N))
    row_m = torch.full((N,), k.NEG, device=dev, dtype=f32)
    col_m = torch.full((M,), k.NEG, device=dev, dtype=f32)
    row_s = torch.zeros(N, device=dev, dtype=f32)
    col_s = torch.zeros(M, device=dev, dtype=f32)
    for r0 in range(0, N, rows):
        nr = min(rows, N - r0)
        n_tiles_m, n_tiles_n = _cdiv(nr, bm), _cdiv(M, bn)
        # Views of the first panel's buffers sized for this (possibly shorter, last) panel.
        rp = row_part.view(2, -1)[:, : n_tiles_n * nr].view(2, n_tiles_n, nr)
        cp = col_part.view(2, -1)[:, : n_tiles_m * M].view(2, n_tiles_m, M)
        launch(meta, r0, nr, rp, cp, zt)
        blk = k.MERGE_BLOCK
        k.lse_merge_kernel[(_cdiv(nr, blk),)](
            rp[0], rp[1], row_m[r0:], row_s[r0:], n_tiles_n, nr, rp.stride(1), BLOCK=blk
        )
        k.lse_merge_kernel[(_cdiv(M, blk),)](cp[0], cp[1], col_m, col_s, n_tiles_m, M, cp.stride(1), BLOCK=blk)
    return row_m, torch.log2(row_s), col_m, torch.log2(col_s), zt


# cuBLAS accumulation modes, probed once per (device, dtype): "addmm_fp32" (one GEMM, fp32 C updated in place; torch
# builds with the out_dtype overloads), "mm_fp32" (fp32 GEMM output, then add), "mm" (feature-dtype GEMM output,
# then add: each block's product is rounded once, no worse than the rounding of dS itself).
_CUBLAS_MODE: dict[tuple[str, torch.dtype], str] = {}


def _probe_cublas_mode(device: torch.device, dtype: torch.dtype) -> str:
    key = (str(device), dtype)
    if key in _CUBLAS_MODE:
        return _CUBLAS_MODE[key]
    mode = "mm"
    if dtype != torch.float32 and device.type == "cuda":
        g = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(96, 80, generator=g).to(device=device, dtype=dtype)
        b = torch.randn(80, 72, generator=g).to(device=device, dtype=dtype)
        c0 = torch.randn(96, 72, generator=g).to(device)
        want = c0 + a.float() @ b.float()
        for candidate in ("addmm_fp32", "mm_fp32"):
            try:
                c = c0.clone()
                _cublas_acc(c, a, b, candidate)
                if c.dtype == torch.float32 and torch.allclose(c, want, rtol=1e-4, atol=1e-3):
                    mode = candidate
                    break
            except (RuntimeError, TypeError):  # older torch: no out_dtype overloads
                continue
    _CUBLAS_MODE[key] = mode
    return mode


def _cublas_acc(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mode: str) -> None:
    if a.dtype == torch.float32:
        torch.addmm(c, a, b, out=c)
    elif mode == "addmm_fp32":
        torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
    elif mode == "mm_fp32":
        c.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        c.add_(torch.mm(a, b))


def _triton_acc(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    k = _kernels()
    M, K = a.shape
    N = b.shape[1]
    flags = {"IEEE": a.dtype == torch.float32, "UPCAST": k.INTERPRET and a.dtype == torch.bfloat16}

    def launch(meta: dict, out: torch.Tensor) -> None:
        k.acc_gemm_kernel[(_cdiv(M, meta["BLOCK_M"]) * _cdiv(N, meta["BLOCK_N"]),)](
            a,
            b,
            out,
            M,
            N,
            K,
            a.stride(0),
            a.stride(1),
            b.stride(0),
            b.stride(1),
            out.stride(0),
            EVEN_K=K % meta["BLOCK_K"] == 0,
            **flags,
            **meta,
        )

    cands = k.candidates("gemm", a.element_size())
    # A accumulating trial must not touch the real C: it runs on a copy.
    meta = k.choose("gemm", (a.dtype, M, N, K, a.stride(0) == 1), cands, lambda m: launch(m, c.clone()))
    launch(meta, c)


def _resolve_gemm(plan: FusedPlan, device: torch.device) -> str:
    gemm = os.environ.get("VLKIT_FUSED_GEMM", plan.gemm) if plan.gemm == "auto" else plan.gemm
    if gemm == "auto":
        gemm = "cublas" if device.type == "cuda" else "triton"
    if gemm not in ("cublas", "triton"):
        raise ValueError(f"unknown fused GEMM backend {gemm!r}; expected 'cublas', 'triton' or 'auto'")
    return gemm


def _backward(x, y, scale, labels, stats, coef, plan, need_x, need_y):
    """Gradients ``(dX, dY, d_scale)``.

    ``stats = (row_m, row_l, col_m, col_l, d_row, d_col)``: per row / column the max logit and ``log2 sum 2^(z -
    max)``, and per pair the two forward losses (log2 units), with the label multiplicities and ignored rows already
    folded in; ``coef = grad_output / (2N)`` (a device scalar).
    """
    row_m, row_l, col_m, col_l, d_row, d_col = stats
    k = _kernels()
    (N, D), M = x.shape, y.shape[0]
    dtype, device = x.dtype, x.device
    rows = min(plan.bwd_rows or _BWD_BLOCK, N)
    cols = min(plan.bwd_cols or rows, M)
    cols = max(1, min(cols, _BWD_BLOCK_BYTES // (rows * x.element_size())))

    # beta multiplies the bracket in-kernel. fp16 cannot hold s*g/(2N)*P (often < 2^-24), so it stores the bracket
    # times a power of two near sqrt(N) (values ~1/sqrt(N) .. (2 + max label count) * sqrt(N)) and the fp32
    # accumulators are rescaled afterwards.
    post = None
    if dtype == torch.float16:
        max_count = 1 if labels is None else int(torch.bincount(labels[labels >= 0], minlength=1).max().item())
        gamma = 2.0 ** min(math.floor(math.log2(N) / 2), math.floor(math.log2(2.0**14 / (2 + max_count))))
        beta = torch.full((), gamma, device=device, dtype=torch.float32)
        post = scale * coef / gamma
    else:
        beta = (scale * coef).reshape(())

    gemm = _resolve_gemm(plan, device)
    mode = _probe_cublas_mode(device, dtype) if gemm == "cublas" else ""

    def acc(c, a, b):
        if gemm == "cublas":
            _cublas_acc(c, a, b, mode)
        else:
            _triton_acc(c, a, b)

    # fp32 features accumulate straight into their gradient tensors; 16-bit ones into fp32 buffers (a dX block,
    # the whole dY) that are rounded once at the end.
    fp32 = dtype == torch.float32
    dx = dx_block = dy_acc = None
    if need_x:
        dx = torch.zeros(N, D, device=device, dtype=dtype) if fp32 else torch.empty(N, D, device=device, dtype=dtype)
        if not fp32:
            dx_block = torch.empty(rows, D, device=device, dtype=torch.float32)
    if need_y:
        dy_acc = torch.zeros(M, D, device=device, dtype=torch.float32)
    ds_buf = torch.empty(rows, cols, device=device, dtype=dtype)
    has_labels = labels is not None
    tgt = labels if has_labels else row_m  # a dummy pointer when HAS_LABELS is False

    def launch(meta, r0, c0, nr, nc, ds, dscale_out):
        k.ds_kernel[(_cdiv(nr, meta["BLOCK_M"]) * _cdiv(nc, meta["BLOCK_N"]),)](
            x[r0:],
            y[c0:],
            scale,
            beta,
            row_m[r0:],
            row_l[r0:],
            col_m[c0:],
            col_l[c0:],
            tgt[r0:],
            d_row[r0:],
            d_col[r0:],
            ds,
            dscale_out,
            r0,
            c0,
            nr,
            nc,
            D,
            x.stride(0),
            y.stride(0),
            ds.stride(0),
            HAS_LABELS=has_labels,
            **_flags(x, D, meta["BLOCK_K"]),
            **meta,
        )

    def trial(meta):
        # The first block, into the real dS buffer (overwritten below anyway) and a scratch d(scale) buffer.
        nr, nc = min(rows, N), min(cols, M)
        tiles = _cdiv(nr, meta["BLOCK_M"]) * _cdiv(nc, meta["BLOCK_N"])
        launch(meta, 0, 0, nr, nc, ds_buf[:nr, :nc], torch.empty(tiles, device=device, dtype=torch.float32))

    key = (dtype, D, has_labels, rows >= 8192 and cols >= 8192)
    meta = k.choose("ds", key, k.candidates("ds", x.element_size()), trial)
    tiles = _cdiv(rows, meta["BLOCK_M"]) * _cdiv(cols, meta["BLOCK_N"])
    dscale_part = torch.zeros(_cdiv(N, rows) * _cdiv(M, cols) * tiles, device=device, dtype=torch.float32)
    block = 0
    for r0 in range(0, N, rows):
        nr = min(rows, N - r0)
        if need_x:
            dxa = dx[r0 : r0 + nr] if fp32 else dx_block[:nr]
            if not fp32:
                dxa.zero_()
        for c0 in range(0, M, cols):
            nc = min(cols, M - c0)
            ds = ds_buf[:nr, :nc]
            launch(meta, r0, c0, nr, nc, ds, dscale_part[block * tiles :])
            block += 1
            if need_x:
                acc(dxa, ds, y[c0 : c0 + nc])
            if need_y:
                acc(dy_acc[c0 : c0 + nc], ds.t(), x[r0 : r0 + nr])
        if need_x and not fp32:
            dx[r0 : r0 + nr].copy_(dxa if post is None else dxa * post)
    dy = None
    if need_y:
        if post is not None:
            dy_acc.mul_(post)
        dy = dy_acc if fp32 else dy_acc.to(dtype)
    return dx, dy, dscale_part.sum() * coef


class _FusedContrastiveLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, scale, labels, plan):
        N = x.shape[0]
        with _device_guard(x.device):
            row_m, row_l, col_m, col_l, zt = _forward_stats(x, y, scale, labels, plan)
        # Per-pair losses in log2 units: (max - target) is exactly 0 when the target is the max, leaving log2 sum.
        d_row = (row_m - zt) + row_l
        if labels is None:
            d_col = (col_m - zt) + col_l
        else:
            t = labels.clamp(min=0)
            d_col = (col_m[t] - zt) + col_l[t]
            valid = labels >= 0
            d_row = torch.where(valid, d_row, torch.zeros_like(d_row))
            d_col = torch.where(valid, d_col, torch.zeros_like(d_col))
        loss = (d_row + d_col).sum() * (_kernels().LN2 / (2 * N))
        ctx.save_for_backward(x, y, scale, labels, row_m, row_l, col_m, col_l, d_row, d_col)
        ctx.plan = plan
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        x, y, scale, labels, row_m, row_l, col_m, col_l, d_row, d_col = ctx.saved_tensors
        need_x, need_y, need_s = ctx.needs_input_grad[:3]
        if not (need_x or need_y or need_s):
            return None, None, None, None, None
        N, M = x.shape[0], y.shape[0]
        if labels is not None:
            # Column j appears count_j times in the column term: count_j * 2^(z - m - l) = 2^(z - m - (l - log2
            # count_j)); l = +inf (a column nobody targets, an ignored row) drops the term. The kernel's -2 never
            # fires for an ignored row, whose label is negative.
            valid = labels >= 0
            counts = torch.bincount(labels[valid], minlength=M).to(torch.float32)
            col_l = col_l - torch.log2(counts)
            d_col = d_col - torch.log2(counts[labels.clamp(min=0)])
            row_l = torch.where(valid, row_l, torch.full_like(row_l, math.inf))
        coef = grad_out.float().reshape(()) / (2 * N)
        with _device_guard(x.device):
            stats = (row_m, row_l, col_m, col_l, d_row, d_col)
            dx, dy, dscale = _backward(x, y, scale, labels, stats, coef, ctx.plan, need_x, need_y)
        return dx, dy, (dscale if need_s else None), None, None


def _device_guard(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@torch.compiler.disable
def fused_contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    labels: torch.Tensor | None = None,
    *,
    plan: FusedPlan | None = None,
) -> torch.Tensor:
    """Bidirectional CLIP loss computed by Triton kernels, exact and without the ``N x M`` logits.

    Same definition as :func:`vlkit.losses.naive.naive_contrastive_loss` (see the module docstring): the mean of the
    image->text and text->image cross-entropies of ``S = logit_scale * image_features @ text_features.T``, each
    weighted ``1 / (2N)``. Accumulation is fp32 throughout and fp32 features use IEEE fp32 dot products (no TF32),
    so fp32 results match a float64 reference to ~1e-6 (the cuBLAS GEMMs of the backward follow
    ``torch.backends.cuda.matmul.allow_tf32``). Excluded from ``torch.compile`` graphs (a graph break).

    Args:
        image_features: ``[N, D]`` float32, bfloat16 or float16 image embeddings (normally unit-norm).
        text_features: ``[M, D]`` text embeddings (mixed dtypes are promoted).
        logit_scale: The already-exponentiated temperature, a one-element tensor (gets an exact gradient) or a float.
        labels: Optional ``[N]`` integer targets: ``labels[i]`` is the text column of image row ``i``, and column
            ``labels[i]`` targets row ``i`` in the text->image direction; negative labels drop their row's pair.
            ``None`` means ``arange(N)`` (and needs ``N == M``). Explicit labels cost one host sync (range check).
        plan: Work-splitting overrides for tests and benchmarks; leave ``None``.

    Returns:
        The scalar loss in float32 (also for 16-bit features, whose gradients come back in their own dtype).

    Raises:
        ValueError: On mismatched shapes, unsupported dtypes, or labels of the wrong shape, dtype or range.
        RuntimeError: When the fused kernels cannot run on the features' device (see :func:`fused_available`).
    """
    if image_features.dim() != 2 or text_features.dim() != 2 or image_features.shape[1] != text_features.shape[1]:
        raise ValueError(
            "fused_contrastive_loss needs [N, D] image and [M, D] text features, got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    (N, D), M = image_features.shape, text_features.shape[0]
    if N == 0 or M == 0 or D == 0:
        raise ValueError("fused_contrastive_loss needs non-empty features")
    device = image_features.device
    if text_features.device != device:
        raise ValueError("image and text features must be on the same device")
    dtype = torch.promote_types(image_features.dtype, text_features.dtype)
    if dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"fused_contrastive_loss supports float32, bfloat16 and float16 features, got {dtype}")
    if labels is None:
        if N != M:
            raise ValueError(f"default labels need as many texts as images, got {N} and {M}")
    else:
        if labels.shape != (N,):
            raise ValueError(f"labels must have shape ({N},), got {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if not fused_available(device):
        raise RuntimeError(
            f"the fused contrastive loss needs CUDA with Triton (or TRITON_INTERPRET=1 on the CPU); got {device}"
        )
    x = image_features.to(dtype).contiguous()
    y = text_features.to(dtype).contiguous()
    if not isinstance(logit_scale, torch.Tensor):
        logit_scale = torch.tensor(float(logit_scale), device=device)
    if logit_scale.numel() != 1:
        raise ValueError("logit_scale must have one element")
    scale = logit_scale.to(device=device, dtype=torch.float32).reshape(())
    if labels is not None:
        labels = labels.to(device=device, dtype=torch.int64).contiguous()
        # Out-of-range labels would be out-of-bounds reads in-kernel; checking costs one host sync.
        if bool(labels.max() >= M):
            raise ValueError(f"labels must be < {M} (negative ones are ignored)")
    return _FusedContrastiveLoss.apply(x, y, scale, labels, plan or FusedPlan())
