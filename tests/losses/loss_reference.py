"""Float64 references for the loss tests, written from the definitions (not from vlkit's code).

Every gradient is a sum of terms that can cancel: the logit-scale gradient
``sum_ij dL/dS_ij * <x_i, y_j>`` (heavily so for SigLIP at its initial bias), or a feature gradient
``scale * sum_j dL/dS_ij * y_j`` when all features coincide (it is then exactly zero). No float32
implementation reaches a 1e-5 relative error on such a sum: the naive float32 loss misses it too.
So the references also return the magnitude ("mass") of the terms, and the errors are measured
against ``max(|ref|, mass / 100)``: the plain relative error whenever cancellation loses less than
a factor 100.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error of ``a`` against the reference ``b``."""
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != {tuple(b.shape)}")
    return float((a - b).norm() / b.norm().clamp_min(1e-30)) if b.norm() > 0 else float((a - b).norm())


def grad_err(a: torch.Tensor, b: torch.Tensor, mass: torch.Tensor, cancellation: float = 100.0) -> float:
    """Norm-wise error of a gradient against ``max(||b||, mass / cancellation)`` (see the module docstring).

    Degenerate inputs, whose gradients cancel completely, are judged with ``cancellation=1``: the
    error relative to the size of the terms, which float32 rounding of logits near 100 bounds.
    """
    a, b = a.detach().double(), b.detach().double().reshape(a.shape)
    denom = max(float(b.norm()), float(mass.detach()) / cancellation, 1e-30)
    return float((a - b).norm()) / denom


scalar_err = grad_err


def _leaves(x, y, *scalars):
    out = [x.detach().double().clone().requires_grad_(), y.detach().double().clone().requires_grad_()]
    out += [torch.tensor(float(v), dtype=torch.float64, requires_grad=True) for v in scalars]
    return out


def contrastive_reference(x, y, scale, labels=None):
    """Float64 CLIP loss ``(1/2N) sum_i [(lse_j S_ij - S_il) + (lse_k S_kl - S_il)]``, ``l = labels[i]``.

    Returns:
        dict with loss, d_image, d_text, d_scale, scale_mass.
    """
    x, y, s = _leaves(x, y, scale)
    n = x.shape[0]
    labels = torch.arange(n) if labels is None else labels.long().cpu()
    dot = x @ y.T
    logits = s * dot
    logits.retain_grad()
    rows = torch.arange(n)
    pos = logits[rows, labels]
    loss = ((torch.logsumexp(logits, 1) - pos).sum() + (torch.logsumexp(logits, 0)[labels] - pos).sum()) / (2 * n)
    loss.backward()
    return {
        "loss": loss.detach(),
        "d_image": x.grad,
        "d_text": y.grad,
        "d_scale": s.grad,
        **_masses(logits.grad, dot, x, y, s),
    }


def _masses(dlogits, dot, x, y, s):
    g = dlogits.abs()
    return {
        "scale_mass": (g * dot.abs()).sum(),
        "image_mass": (s.detach().abs() * g @ y.detach().abs()).norm(),
        "text_mass": (s.detach().abs() * g.T @ x.detach().abs()).norm(),
    }


def siglip_reference(x, y, scale, bias):
    """Float64 SigLIP loss ``-(1/N) sum_ij log sigmoid(z_ij (scale <x_i, y_j> + bias))``.

    Returns:
        dict with loss, d_image, d_text, d_scale, d_bias, scale_mass, bias_mass.
    """
    x, y, s, b = _leaves(x, y, scale, bias)
    n = x.shape[0]
    dot = x @ y.T
    logits = s * dot + b
    logits.retain_grad()
    z = 2 * torch.eye(n, dtype=torch.float64) - 1
    loss = -F.logsigmoid(z * logits).sum() / n
    loss.backward()
    return {
        "loss": loss.detach(),
        "d_image": x.grad,
        "d_text": y.grad,
        "d_scale": s.grad,
        "d_bias": b.grad,
        "bias_mass": logits.grad.abs().sum(),
        **_masses(logits.grad, dot, x, y, s),
    }


def unit_features(n, d, seed, kind="random", dtype=torch.float64):
    """Unit-norm feature pairs; ``kind`` picks the degenerate cases the losses must survive."""
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    y = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    if kind == "identical":
        # Every logit equal to +scale.
        x = x[:1].expand(n, d).clone()
        y = x.clone()
    elif kind == "antipodal":
        # Every logit equal to -scale.
        x = x[:1].expand(n, d).clone()
        y = -x
    elif kind == "half_antipodal":
        # Logits +scale and -scale side by side: the widest range (2 * scale) within a tile.
        v = x[:1].expand(n, d).clone()
        sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).double()[:, None]
        x, y = v * sign, v.clone()
    elif kind == "aligned":
        # Positives nearly identical: the trained regime, where the loss is small.
        y = F.normalize(x + 0.05 * torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    elif kind != "random":
        raise ValueError(kind)
    return x.to(dtype), y.to(dtype)
