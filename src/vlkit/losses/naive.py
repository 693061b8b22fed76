"""Reference contrastive loss that materialises the full logit matrix.

It is the definition the other implementations are tested against, so it favours clarity: the
logits are formed in float32 (float64 for float64 inputs) with autocast off, and plain autograd
provides the backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlkit.losses.tiled import compute_dtype

__all__ = ["naive_contrastive_loss"]


def naive_contrastive_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    labels: Tensor | None = None,
    *,
    row_weight: float | None = None,
    col_weight: float | None = None,
) -> Tensor:
    """Contrastive loss from the full ``N x M`` logit matrix.

    Same definition and arguments as :func:`vlkit.losses.tiled.tiled_contrastive_loss`: positive
    pairs ``(i, labels[i])``; the image->text term is the cross-entropy of row ``i`` with target
    ``labels[i]``, the text->image term the cross-entropy of column ``labels[i]`` (over all images)
    with target ``i``; each weighted by ``1 / (2N)`` unless given. Rows with a negative label are ignored.

    Args:
        image_features: ``[N, D]``.
        text_features: ``[M, D]``.
        logit_scale: already-exponentiated scale (tensor with one element, or a float).
        labels: ``[N]`` long; ``arange(N)`` when None.
        row_weight: weight of the image->text sum; ``1 / (2N)`` when None.
        col_weight: weight of the text->image sum; ``1 / (2N)`` when None.

    Returns:
        Scalar loss in float32 (float64 for float64 inputs).
    """
    N, M = image_features.shape[0], text_features.shape[0]
    if labels is None:
        if N != M:
            raise ValueError(f"default labels need as many texts as images, got {N} and {M}")
        labels = torch.arange(N, device=image_features.device)
    w_default = 1.0 / (2 * max(N, 1))
    rw = w_default if row_weight is None else float(row_weight)
    cw = w_default if col_weight is None else float(col_weight)
    cdt = compute_dtype(image_features.dtype)
    with torch.autocast(image_features.device.type, enabled=False):
        if isinstance(logit_scale, Tensor):
            scale = logit_scale.to(cdt).reshape(())
        else:
            scale = torch.tensor(float(logit_scale), dtype=cdt, device=image_features.device)
        logits = scale * (image_features.to(cdt) @ text_features.to(cdt).T)
        valid = labels >= 0
        target = labels.clamp(min=0)
        pos = logits.gather(1, target[:, None]).squeeze(1)
        zero = logits.new_zeros(())
        loss = logits.new_zeros(())
        if rw > 0:
            loss = loss + rw * torch.where(valid, torch.logsumexp(logits, dim=1) - pos, zero).sum()
        if cw > 0:
            col_lse = torch.logsumexp(logits, dim=0)
            loss = loss + cw * torch.where(valid, col_lse[target] - pos, zero).sum()
    return loss
