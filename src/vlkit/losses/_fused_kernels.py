"""Triton kernels behind :mod:`vlkit.losses.fused`.

Importing this module imports Triton. Whether the kernels run compiled (CUDA) or in Triton's CPU interpreter is
decided once, here, from ``TRITON_INTERPRET`` at import time, because ``triton.jit`` makes that choice when a kernel
is decorated.

Logits are kept in base 2 (``z = S * log2(e)``) so every exponential is a single ``ex2``. A log-sum-exp is carried
as a pair ``(m, s)`` with ``m`` the exact maximum logit and ``s = sum 2^(z - m)``, never as one number ``m + log2 s``:
at ``|z| ~ 100`` a single fp32 number is only good to ~1e-5 absolute, which is the whole loss (and the whole target
gradient ``P - 1``) once the pairs are well separated. With the pair, ``z_target - m`` is exactly 0 when the target
is the maximum and the loss reduces to ``log2 s``, as accurate as the naive fp32 loss.

Kernels:

* ``_fwd_kernel``: one logit tile per program; emits the tile's row and column ``(max, sum)`` partials, and the
  target logits of the rows whose target lies in the tile.
* ``_lse_merge_kernel``: folds a ``[n_part, n]`` partial buffer into a running ``[n]`` ``(max, sum)``.
* ``_ds_kernel``: one tile of ``dS = beta * (P_row + P_col - 2 * onehot)`` written to a block buffer, plus the
  tile's contribution to ``sum(dS * <x, y>)`` for the logit-scale gradient.
* ``_acc_gemm_kernel``: ``C (fp32) += A @ B`` with arbitrary strides, used for ``dX += dS @ Y`` and
  ``dY += dS^T @ X`` when cuBLAS is not used.

The backward does not rely on recomputing bit-identical logits (its tile shape may differ from the forward's): at
the target entries, where ``P ~ 1`` and the bracket ``P - 1`` cancels, it uses the forward's per-pair losses
``d = lse - z_target`` instead, ``P = 2^-d``.

Tile shapes are chosen per problem by :func:`choose` (a small autotuner of our own: Triton's would leave stale
partials behind when configs with different tile counts write the same buffers, and its API differs across the
Triton versions we support).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

LN2 = math.log(2.0)
_LOG2E = tl.constexpr(1.4426950408889634)
# A finite "minus infinity": masked lanes must never produce (-inf) - (-inf) = NaN inside a reduction.
NEG = -1.0e30
_NEG = tl.constexpr(NEG)
# Tiles whose logits (log2 units) span less than this take the one-exponential path in the forward: every
# 2^(z - tile_max) is then >= 2^-100, far above fp32's smallest normal, so nothing underflows.
_FAST_RANGE = tl.constexpr(100.0)

MERGE_BLOCK = 128 if INTERPRET else 1024


@triton.jit
def _swizzle(pid, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Programs that run together share row tiles (GROUP_M of them) so their column tiles are reused from L2.
    num_pid_m = tl.cdiv(n_rows, BLOCK_M)
    num_pid_n = tl.cdiv(n_cols, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _tile_dot(
    x_ptr,
    y_ptr,
    rows,
    cols,
    D,
    stride_x,
    stride_y,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Raw fp32 dot products ``x[rows] @ y[cols].T`` for in-range (already wrapped) row and column indices."""
    # int64 offsets: rows * stride passes 2^31 at about two million 1024-wide features.
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    y_cols = y_ptr + cols.to(tl.int64)[None, :] * stride_y
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            a = tl.load(x_rows + ks[None, :])
            b = tl.load(y_cols + ks[:, None])
        else:
            a = tl.load(x_rows + ks[None, :], mask=ks[None, :] < D, other=0.0)
            b = tl.load(y_cols + ks[:, None], mask=ks[:, None] < D, other=0.0)
        if UPCAST:
            # The interpreter multiplies bf16 tiles as their raw uint16 bit patterns; fp32 is exact for bf16 products.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _fwd_kernel(
    x_ptr,
    y_ptr,
    scale_ptr,
    tgt_ptr,
    row_m_ptr,
    row_s_ptr,
    col_m_ptr,
    col_s_ptr,
    zt_ptr,
    row0,
    n_rows,
    n_cols,
    D,
    stride_x,
    stride_y,
    stride_row_part,
    stride_col_part,
    HAS_LABELS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Row and column ``(max, sum 2^(z - max))`` of one ``BLOCK_M x BLOCK_N`` logit tile, plus target logits.

    ``x_ptr``/``tgt_ptr``/``zt_ptr`` point at the panel's first row (global row ``row0``); the columns are all of
    ``y``. Writes ``row_*[pid_n, row]`` and ``col_*[pid_m, col]``, merged afterwards by ``_lse_merge_kernel``. A tile
    grid (instead of a program per row block looping over columns) needs no online rescaling and keeps every SM
    busy at any shape.
    """
    pid_m, pid_n = _swizzle(tl.program_id(0), n_rows, n_cols, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < n_rows
    col_ok = offs_n < n_cols
    # Out-of-range lanes load a real (wrapped) row instead of being masked, so the main loop carries no masks;
    # they are excluded below.
    acc = _tile_dot(
        x_ptr,
        y_ptr,
        offs_m % n_rows,
        offs_n % n_cols,
        D,
        stride_x,
        stride_y,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        EVEN_K,
        IEEE,
        UPCAST,
    )
    z = acc * (tl.load(scale_ptr) * _LOG2E)
    z = tl.where(row_ok[:, None] & col_ok[None, :], z, _NEG)

    # Target logits, taken from this very tile so that they are bit-identical to the z the LSEs are built from.
    col_lo = pid_n * BLOCK_N
    if HAS_LABELS:
        tgt = tl.load(tgt_ptr + offs_m % n_rows)
        hit = offs_n[None, :] == tgt[:, None]
        mine = row_ok & (tgt >= col_lo) & (tgt < col_lo + BLOCK_N)
        tl.store(zt_ptr + offs_m, tl.sum(tl.where(hit, z, 0.0), 1), mask=mine)
    else:
        row_lo = row0 + pid_m * BLOCK_M
        # Only tiles crossing the diagonal hold targets; the test is per tile, so the others pay nothing.
        if (row_lo < col_lo + BLOCK_N) & (col_lo < row_lo + BLOCK_M):
            rows_g = row0 + offs_m
            hit = offs_n[None, :] == rows_g[:, None]
            mine = row_ok & (rows_g >= col_lo) & (rows_g < col_lo + BLOCK_N)
            tl.store(zt_ptr + offs_m, tl.sum(tl.where(hit, z, 0.0), 1), mask=mine)

    row_max = tl.max(z, 1)
    col_max = tl.max(z, 0)
    hi = tl.max(row_max, 0)
    lo = tl.min(tl.min(z, 1), 0)
    if hi - lo <= _FAST_RANGE:
        # One exponential serves both directions (MUFU throughput, not the tensor cores, bounds this epilogue);
        # the sums are moved onto each row's / column's own max with one exp2 per row and per column.
        e = tl.exp2(z - hi)
        row_sum = tl.sum(e, 1) * tl.exp2(hi - row_max)
        col_sum = tl.sum(e, 0) * tl.exp2(hi - col_max)
    else:
        # Wide tiles (edge tiles, or logit scales near 100 with opposed features) need a max per row and per column.
        row_sum = tl.sum(tl.exp2(z - row_max[:, None]), 1)
        col_sum = tl.sum(tl.exp2(z - col_max[None, :]), 0)

    tl.store(row_m_ptr + pid_n * stride_row_part + offs_m, row_max, mask=row_ok)
    tl.store(row_s_ptr + pid_n * stride_row_part + offs_m, row_sum, mask=row_ok)
    tl.store(col_m_ptr + pid_m * stride_col_part + offs_n, col_max, mask=col_ok)
    tl.store(col_s_ptr + pid_m * stride_col_part + offs_n, col_sum, mask=col_ok)


@triton.jit
def _lse_merge_kernel(m_part_ptr, s_part_ptr, m_ptr, s_ptr, n_part, n, stride_part, BLOCK: tl.constexpr):
    """Folds ``n_part`` partial ``(max, sum)`` pairs into the running pair ``(m[j], s[j])`` (start: ``(NEG, 0)``)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    m0 = tl.load(m_ptr + offs, mask=mask, other=_NEG)
    s0 = tl.load(s_ptr + offs, mask=mask, other=0.0)
    # Two passes (max, then rescaled sum) keep the final m an exact logit, the row's (column's) true maximum.
    m = m0
    for p in range(0, n_part):
        m = tl.maximum(m, tl.load(m_part_ptr + p * stride_part + offs, mask=mask, other=_NEG))
    s = s0 * tl.exp2(m0 - m)
    for p in range(0, n_part):
        mp = tl.load(m_part_ptr + p * stride_part + offs, mask=mask, other=_NEG)
        sp = tl.load(s_part_ptr + p * stride_part + offs, mask=mask, other=0.0)
        s += sp * tl.exp2(mp - m)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(s_ptr + offs, s, mask=mask)


@triton.jit
def _ds_kernel(
    x_ptr,
    y_ptr,
    scale_ptr,
    beta_ptr,
    row_m_ptr,
    row_l_ptr,
    col_m_ptr,
    col_l_ptr,
    tgt_ptr,
    d_row_ptr,
    d_col_ptr,
    ds_ptr,
    dscale_part_ptr,
    row0,
    col0,
    n_rows,
    n_cols,
    D,
    stride_x,
    stride_y,
    stride_ds,
    HAS_LABELS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One tile of ``dS = beta * (2^(z - m_r - l_r) + 2^(z - m_c - l_c) - 2 [col == target(row)])``.

    ``(m, l)`` are each row's / column's max logit and ``log2 sum 2^(z - m)``; at a target entry the bracket is
    ``(2^-d_row - 1) + (2^-d_col - 1)`` from the pair's forward losses ``d`` (see the module docstring). The row
    pointers (``x``, LSEs, ``tgt``, ``d_*``) start at the block's first row, the column ones at its first column;
    ``row0``/``col0`` are the global offsets, needed only to find the diagonal. ``l`` may be ``+inf`` (a column
    nobody targets, an ignored row), which correctly drops that term. The tile's ``sum(bracket * <x, y>)`` goes to
    ``dscale_part[pid]`` (deterministic, unlike an atomic scalar).
    """
    pid = tl.program_id(0)
    pid_m, pid_n = _swizzle(pid, n_rows, n_cols, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m % n_rows
    cols = offs_n % n_cols
    acc = _tile_dot(x_ptr, y_ptr, rows, cols, D, stride_x, stride_y, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, IEEE, UPCAST)
    z = acc * (tl.load(scale_ptr) * _LOG2E)
    # Wrapped indices keep every lane a genuine logit with its own LSEs, so no lane can overflow exp2.
    m_r = tl.load(row_m_ptr + rows)
    l_r = tl.load(row_l_ptr + rows)
    m_c = tl.load(col_m_ptr + cols)
    l_c = tl.load(col_l_ptr + cols)
    p = tl.exp2((z - m_r[:, None]) - l_r[:, None]) + tl.exp2((z - m_c[None, :]) - l_c[None, :])
    if HAS_LABELS:
        tgt = tl.load(tgt_ptr + rows)
    else:
        tgt = row0 + rows
    # The -2 is folded in before rounding dS to the feature dtype: near convergence P ~ 1 at the target and the
    # difference is small, so subtracting after a bf16 round-trip (or from a recomputed P) would lose it.
    p_tgt = (tl.exp2(-tl.load(d_row_ptr + rows)) - 1.0) + (tl.exp2(-tl.load(d_col_ptr + rows)) - 1.0)
    p = tl.where((col0 + cols)[None, :] == tgt[:, None], p_tgt[:, None], p)
    valid = (offs_m < n_rows)[:, None] & (offs_n < n_cols)[None, :]
    p = tl.where(valid, p, 0.0)
    tl.store(dscale_part_ptr + pid, tl.sum(tl.sum(p * acc, 1), 0))
    ds = (p * tl.load(beta_ptr)).to(ds_ptr.dtype.element_ty)
    tl.store(ds_ptr + offs_m[:, None] * stride_ds + offs_n[None, :], ds, mask=valid)


@triton.jit
def _acc_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``C[M, N] += A[M, K] @ B[K, N]`` with an fp32, row-major C (unit column stride) and any A/B strides."""
    pid_m, pid_n = _swizzle(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    a_rows = a_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_am
    b_cols = b_ptr + (offs_n % N)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a_ptrs = a_rows + ks.to(tl.int64)[None, :] * stride_ak
        b_ptrs = b_cols + ks.to(tl.int64)[:, None] * stride_bk
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=ks[None, :] < K, other=0.0)
            b = tl.load(b_ptrs, mask=ks[:, None] < K, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    # C is read after the main loop, not used as the initial accumulator, to keep it out of the loop's registers.
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    c_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(c_ptrs, tl.load(c_ptrs, mask=c_mask, other=0.0) + acc, mask=c_mask)


def _meta(bm, bn, bk, warps, stages, maxnreg=None) -> dict:
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": warps, "num_stages": stages}
    if maxnreg is not None:
        # Caps registers so two CTAs share an SM and one's exponential-heavy epilogue hides behind the other's MMAs
        # (ptxas, sm_90: the 128x128 forward fits 128 registers without spilling; the dS kernel spills a little).
        meta["maxnreg"] = maxnreg
    return meta


def candidates(kernel: str, dtype_bytes: int) -> list[dict]:
    """Launch configurations tried by :func:`choose`; the first is the default when not tuning."""
    if INTERPRET:
        # Few, large programs: the interpreter's cost is per program and per op, not per element.
        return [_meta(64, 64, 64, 4, 1)]
    if dtype_bytes == 4:
        # IEEE fp32 dots run on the FMA pipes; the exactness path, not the fast one.
        return [_meta(128, 128, 32, 8, 3), _meta(64, 128, 32, 4, 3), _meta(128, 64, 32, 4, 3)]
    if kernel == "fwd":
        return [
            _meta(128, 128, 64, 8, 3, 128),
            _meta(128, 128, 64, 8, 3),
            _meta(64, 128, 64, 4, 3, 128),
            _meta(128, 64, 64, 4, 3, 128),
            _meta(128, 128, 64, 8, 4),
        ]
    if kernel == "ds":
        return [
            _meta(128, 128, 64, 8, 3),
            _meta(128, 128, 64, 8, 3, 128),
            _meta(128, 64, 64, 4, 3),
            _meta(128, 64, 64, 4, 3, 128),
            _meta(64, 128, 64, 4, 3),
        ]
    # gemm: C[M, N] += A[M, K] @ B[K, N], N = D. (ptxas, sm_90: 128x256, 256x128 and 4-warp 128x128 tiles spill.)
    return [_meta(128, 128, 64, 8, 3), _meta(128, 128, 64, 8, 4), _meta(64, 128, 64, 4, 4)]


# Tuning compiles and times every candidate on first use of a problem shape (seconds each); VLKIT_FUSED_AUTOTUNE=0,
# or assigning AUTOTUNE at run time, launches the first candidate instead. Off by default when interpreting.
AUTOTUNE = not INTERPRET and os.environ.get("VLKIT_FUSED_AUTOTUNE", "1") != "0"
# key -> (chosen meta, {candidate index: median ms or error}); read by the benchmark script.
TUNED: dict[tuple, tuple[dict, dict]] = {}
# Times a zero-argument callable in ms; None means triton.testing.do_bench (tests substitute a CPU timer).
BENCH: Callable[[Callable[[], None]], float] | None = None


def _do_bench(fn: Callable[[], None]) -> float:
    if BENCH is not None:
        return BENCH(fn)
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=5, rep=25, return_mode="median"))


def choose(kernel: str, key: tuple, cands: list[dict], trial: Callable[[dict], None]) -> dict:
    """The fastest of ``cands`` for ``key``, timing ``trial(meta)`` (which must only write scratch) once per process.

    Args:
        kernel: Kernel name, part of the cache key.
        key: What the best configuration depends on (dtype, D, problem shape class).
        cands: Candidate meta-parameter dicts (as from :func:`candidates`).
        trial: Launches the kernel once with the given meta on representative inputs, writing scratch outputs.

    Returns:
        The chosen meta dict (the first candidate when :data:`AUTOTUNE` is off).
    """
    if not AUTOTUNE:
        return cands[0]
    full_key = (kernel, *key)
    if full_key not in TUNED:
        times = {}
        for i, meta in enumerate(cands):
            try:
                times[i] = _do_bench(lambda m=meta: trial(m))
            except Exception as e:  # noqa: BLE001 - a config that fails to compile or launch is just not chosen
                times[i] = f"{type(e).__name__}: {str(e)[:200]}"
        ok = {i: t for i, t in times.items() if isinstance(t, float)}
        if not ok:
            raise RuntimeError(f"no {kernel} kernel configuration could run: {times}")
        TUNED[full_key] = (cands[min(ok, key=ok.get)], times)
    return TUNED[full_key][0]


fwd_kernel = _fwd_kernel
ds_kernel = _ds_kernel
acc_gemm_kernel = _acc_gemm_kernel
lse_merge_kernel = _lse_merge_kernel
