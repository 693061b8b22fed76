"""The contrastive-loss entry point: one function and one module, dispatching to the implementations.

Implementations (all compute the same loss; see ``docs/losses.md``):

- ``naive``: full ``B x B`` logits, plain autograd. The reference, and open_clip's ``ClipLoss``
  when given a process group.
- ``tiled``: pure PyTorch, logits recomputed tile by tile in a custom backward; O(tile * B) memory.
- ``fused``: Triton kernels (``vlkit.losses.fused``), CUDA only.
- ``ring``: across the ranks of a process group, text shards passed around a ring; O(B_local * D)
  memory per rank.
- ``auto``: ring with a group of size > 1 (when gradients are gathered), else fused on CUDA when
  available, else tiled.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vlkit.losses.distributed import GroupLike, all_gather_no_grad, gather_features, resolve_group, shard_sizes
from vlkit.losses.naive import naive_contrastive_loss
from vlkit.losses.ring import ring_contrastive_loss
from vlkit.losses.tiled import _as_scale, tiled_contrastive_loss

__all__ = ["contrastive_loss", "ContrastiveLoss", "IMPLS", "fused_status"]

IMPLS = ("auto", "naive", "tiled", "fused", "ring")
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_status(device: torch.device) -> tuple[bool, str]:
    """Whether ``impl="fused"`` can run on ``device``, and if not, why.

    Args:
        device: device of the features.

    Returns:
        ``(available, reason)``; ``reason`` is empty when available.
    """
    try:
        from vlkit.losses import fused
    except Exception as e:  # Triton may fail at import time for reasons other than ImportError.
        return False, f"vlkit.losses.fused could not be imported ({type(e).__name__}: {e})"
    fn = getattr(fused, "fused_contrastive_loss", None)
    available = getattr(fused, "fused_available", None)
    if fn is None or available is None:
        return False, "vlkit.losses.fused does not define fused_contrastive_loss and fused_available"
    try:
        ok = bool(available(device))
    except Exception as e:
        return False, f"fused_available({device}) failed ({type(e).__name__}: {e})"
    if not ok:
        return False, f"the Triton kernel is not available on device {device} (needs CUDA, or TRITON_INTERPRET=1)"
    return True, ""


def _fused_loss(image: Tensor, text: Tensor, scale: Tensor | float, labels: Tensor | None) -> Tensor:
    ok, reason = fused_status(image.device)
    if not ok:
        raise RuntimeError(f"impl='fused' cannot run: {reason}; use impl='tiled' or impl='auto'")
    from vlkit.losses.fused import fused_contrastive_loss

    return fused_contrastive_loss(image, text, _as_scale(scale, image), labels=labels)


def _single(impl: str, image: Tensor, text: Tensor, scale: Tensor | float, labels: Tensor | None) -> Tensor:
    if impl == "naive":
        return naive_contrastive_loss(image, text, scale, labels)
    if impl == "fused":
        return _fused_loss(image, text, scale, labels)
    # "ring" without a group of size > 1 is a ring of one: the tiled loss.
    return tiled_contrastive_loss(image, text, scale, labels)


def _weighted(impl: str, image, text, scale, labels, row_weight, col_weight) -> Tensor:
    if impl == "naive":
        return naive_contrastive_loss(image, text, scale, labels, row_weight=row_weight, col_weight=col_weight)
    return tiled_contrastive_loss(image, text, scale, labels, row_weight=row_weight, col_weight=col_weight)


def _gathered(
    impl: str,
    image: Tensor,
    text: Tensor,
    scale: Tensor | float,
    labels: Tensor | None,
    group: dist.ProcessGroup,
    local_loss: bool,
    gather_with_grad: bool,
) -> Tensor:
    # open_clip's ClipLoss, generalised to uneven shards and explicit labels.
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    counts = shard_sizes(group, image.shape[0], text.shape[0], device=image.device)
    img_sizes, txt_sizes = [c[0] for c in counts], [c[1] for c in counts]
    n_total, m_total = sum(img_sizes), sum(txt_sizes)
    img_start, txt_start = sum(img_sizes[:rank]), sum(txt_sizes[:rank])
    if labels is None:
        if n_total != m_total:
            raise ValueError(f"default labels need as many texts as images, got {m_total} and {n_total}")
        local_labels = torch.arange(img_start, img_start + image.shape[0], device=image.device)
        all_labels = torch.arange(n_total, device=image.device)
    else:
        local_labels = labels
        all_labels = all_gather_no_grad(labels, group, img_sizes)
    all_image, all_text = gather_features(
        image, text, group, img_sizes, txt_sizes, local_loss=local_loss, gather_with_grad=gather_with_grad
    )
    if not local_loss:
        if impl == "fused":
            return _fused_loss(all_image, all_text, scale, None if labels is None else all_labels)
        return _single(impl, all_image, all_text, scale, all_labels)
    if impl == "fused":
        raise ValueError("impl='fused' does not support local_loss=True; use 'tiled', 'naive' or 'ring'")
    # Rows of this rank against all texts, plus the columns of this rank's texts over all images.
    # The weight world/(2N) is open_clip's 1/(2 * B_local) for even shards and keeps the mean of the
    # per-rank losses equal to the global loss for uneven ones.
    w = world / (2 * n_total)
    i2t = _weighted(impl, image, all_text, scale, local_labels, w, 0.0)
    rel = all_labels - txt_start
    col_labels = torch.where((rel >= 0) & (rel < text.shape[0]), rel, torch.full_like(rel, -1))
    t2i = _weighted(impl, all_image, text, scale, col_labels, 0.0, w)
    return i2t + t2i


def _check(image: Tensor, text: Tensor, logit_scale: Tensor | float, labels: Tensor | None) -> None:
    if image.ndim != 2 or text.ndim != 2:
        raise ValueError(f"features must be 2-D [batch, dim], got {tuple(image.shape)} and {tuple(text.shape)}")
    if image.shape[1] != text.shape[1]:
        raise ValueError(f"image and text feature dims differ: {image.shape[1]} vs {text.shape[1]}")
    if image.device != text.device:
        raise ValueError(f"image and text features are on different devices: {image.device} vs {text.device}")
    if isinstance(logit_scale, Tensor) and logit_scale.numel() != 1:
        raise ValueError(f"logit_scale must hold a single value, got shape {tuple(logit_scale.shape)}")
    if labels is not None:
        if labels.shape != (image.shape[0],):
            raise ValueError(f"labels must have shape ({image.shape[0]},), got {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integer class indices, got {labels.dtype}")


def _choose(impl: str, image: Tensor, text: Tensor, group, local_loss: bool, gather_with_grad: bool) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if group is not None and gather_with_grad:
        return "ring"
    # The Triton kernels take square problems in 16/32-bit floats.
    fused_fits = (
        image.device.type == "cuda"
        and image.dtype in _FUSED_DTYPES
        and text.dtype in _FUSED_DTYPES
        and (group is not None or image.shape[0] == text.shape[0])
        and not (group is not None and local_loss)
    )
    if fused_fits and fused_status(image.device)[0]:
        return "fused"
    return "tiled"


def contrastive_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    *,
    impl: str = "auto",
    group: GroupLike = None,
    local_loss: bool = False,
    gather_with_grad: bool = True,
    labels: Tensor | None = None,
) -> Tensor:
    """Bidirectional contrastive (CLIP / InfoNCE) loss: mean of image->text and text->image cross-entropies.

    With ``S = logit_scale * image_features @ text_features.T`` and pairs ``(i, labels[i])``:
    ``L = 1/(2N) * sum_i [(logsumexp_j S_ij - S_i,l_i) + (logsumexp_k S_k,l_i - S_i,l_i)]``.
    The first term is the cross-entropy of image ``i`` over all texts with target ``labels[i]``;
    the second the cross-entropy of text ``labels[i]`` over all images with target ``i`` (for a
    permutation this is ``cross_entropy(S.T, argsort(labels))``; a text paired with k images counts
    k times, an unpaired text only as a negative).

    Across ranks (``group`` of size > 1) the features are this rank's shard and the loss is that of
    the concatenated batch. ``impl="ring"`` (the ``auto`` choice) and the gathered impls with
    ``gather_with_grad=True`` all return the global loss on every rank with gradients that, after
    DDP's gradient averaging, equal the single-process gradient. ``local_loss`` and
    ``gather_with_grad=False`` reproduce open_clip's ``ClipLoss`` options exactly (see docs/losses.md).

    Args:
        image_features: ``[n, D]`` image features (normalised by the caller).
        text_features: ``[m, D]`` text features.
        logit_scale: the already-exponentiated, learnable scale (tensor with one element, or a
            float); its gradient is exact.
        impl: ``"auto"``, ``"naive"``, ``"tiled"``, ``"fused"`` or ``"ring"``.
        group: data-parallel process group, ``"world"`` (default group if initialised), or None
            for a single process.
        local_loss: gathered impls only: compute this rank's rows against all columns (open_clip's
            ``local_loss``); the per-rank loss then averages to the global loss over ranks. Ring
            ignores it and always returns the global loss.
        gather_with_grad: gathered impls: let gradients flow through the all-gather to every rank's
            features. False stops them at other ranks' features (open_clip's default); ring
            requires True.
        labels: ``[n]`` integer index of each image's positive text (global index across ranks);
            ``arange`` (the diagonal) when None.

    Returns:
        Scalar loss (float32, or float64 for float64 features).
    """
    _check(image_features, text_features, logit_scale, labels)
    pg = resolve_group(group)
    impl = _choose(impl, image_features, text_features, pg, local_loss, gather_with_grad)
    if labels is not None:
        labels = labels.to(torch.long)
    if pg is None:
        if labels is not None and labels.device.type == "cpu" and labels.numel():
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= text_features.shape[0]:
                raise ValueError(f"labels must lie in [0, {text_features.shape[0]}), got [{lo}, {hi}]")
        return _single(impl, image_features, text_features, logit_scale, labels)
    if impl == "ring":
        if not gather_with_grad:
            raise ValueError(
                "impl='ring' always yields the full gradient; gather_with_grad=False needs a gathered impl"
            )
        return ring_contrastive_loss(image_features, text_features, logit_scale, pg, labels)
    return _gathered(impl, image_features, text_features, logit_scale, labels, pg, local_loss, gather_with_grad)


class ContrastiveLoss(nn.Module):
    """``nn.Module`` wrapper of :func:`contrastive_loss`, configured once and called every step.

    Args:
        impl: implementation, see :func:`contrastive_loss`.
        local_loss: open_clip's ``local_loss`` (gathered impls).
        gather_with_grad: open_clip's ``gather_with_grad`` (gathered impls).
        group: ``"world"`` (default: the default process group when initialised with more than one
            rank, looked up at every call), a ``ProcessGroup``, or None for a single process. The
            module never creates process groups.
    """

    def __init__(
        self,
        impl: str = "auto",
        local_loss: bool = False,
        gather_with_grad: bool = True,
        group: GroupLike = "world",
    ):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.impl = impl
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.group = group

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        labels: Tensor | None = None,
        group: GroupLike = "default",
    ) -> Tensor:
        """Loss for one step; ``group`` overrides the configured group for this call."""
        return contrastive_loss(
            image_features,
            text_features,
            logit_scale,
            impl=self.impl,
            group=self.group if isinstance(group, str) and group == "default" else group,
            local_loss=self.local_loss,
            gather_with_grad=self.gather_with_grad,
            labels=labels,
        )

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}, local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}"
