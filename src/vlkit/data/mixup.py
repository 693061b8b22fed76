"""Mixup and CutMix on a batch, with the semantics of timm's ``Mixup`` in its default ``batch`` mode (the DeiT recipe).

Per batch: with probability ``prob`` the batch is mixed, else left alone (λ = 1). When both are enabled, CutMix is
chosen with probability ``switch_prob``, else Mixup. λ ~ Beta(α, α) with that method's α. Every sample ``i`` is
paired with sample ``B-1-i`` (the batch flipped), so one λ serves the whole batch:

- Mixup: ``x_i = λ·x_i + (1-λ)·x_{B-1-i}``.
- CutMix: a box of side ``int(H·√(1-λ)) x int(W·√(1-λ))`` centred on a uniform random pixel is clipped to the image
  and pasted from the paired image; λ is then corrected to the share of the image the box does *not* cover,
  ``λ = 1 - area(box) / (H·W)``, so the targets weigh each image by the pixels it really contributes.

Targets are soft: ``y_i = λ·t(label_i) + (1-λ)·t(label_{B-1-i})`` where ``t`` is the smoothed one-hot vector
(``1-ε+ε/C`` on the class, ``ε/C`` elsewhere), so label smoothing is folded in. The loss is the soft-target
cross-entropy :func:`soft_target_cross_entropy`.

Random draws come from a NumPy generator seeded by the batch's identity when the loader gives one (the ImageFolder
loader's ``(seed, epoch, batch index)``: the same batch is mixed alike under any parallel layout), else from torch's
global CPU generator (seeded per rank by the trainer and saved in its checkpoints).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MixParams:
    """One batch's mixing: ``lam`` (the weight of each sample's own label) and, for CutMix, the pasted box
    ``(top, bottom, left, right)`` in pixels (bottom/right exclusive). ``lam == 1`` and no box: no mixing."""

    lam: float = 1.0
    box: tuple[int, int, int, int] | None = None

    @property
    def mixed(self) -> bool:
        return self.box is not None or self.lam != 1.0


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """[B] class indices -> [B, C] float targets: ``1 - smoothing + smoothing / C`` on the class, ``smoothing / C``
    elsewhere (the same targets as ``F.cross_entropy(..., label_smoothing=smoothing)`` uses)."""
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    return targets.scatter_(1, labels.long().unsqueeze(1), 1.0 - smoothing + off)


def mix_targets(labels: torch.Tensor, num_classes: int, lam: float, smoothing: float = 0.0) -> torch.Tensor:
    """Soft targets of a batch mixed with its flipped self: ``lam·t(y) + (1-lam)·t(y.flip(0))``."""
    targets = smooth_one_hot(labels, num_classes, smoothing)
    return targets * lam + targets.flip(0) * (1.0 - lam)


def cutmix_box(
    lam: float, height: int, width: int, center_y: int, center_x: int
) -> tuple[tuple[int, int, int, int], float]:
    """The CutMix box for a sampled ``lam`` around a centre pixel, clipped to the image, and the corrected λ.

    The unclipped box has sides ``int(H·√(1-lam))`` and ``int(W·√(1-lam))``, so its area is about ``(1-lam)·H·W``;
    near an edge part of it falls outside, and the returned λ is ``1 - clipped area / (H·W)``.
    """
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    # An odd side puts the extra row / column after the centre, so an unclipped box is exactly cut_h x cut_w.
    top = min(max(center_y - cut_h // 2, 0), height)
    bottom = min(max(center_y + (cut_h + 1) // 2, 0), height)
    left = min(max(center_x - cut_w // 2, 0), width)
    right = min(max(center_x + (cut_w + 1) // 2, 0), width)
    corrected = 1.0 - (bottom - top) * (right - left) / float(height * width)
    return (top, bottom, left, right), corrected


def mix_images(images: torch.Tensor, params: MixParams) -> torch.Tensor:
    """Apply ``params`` to a batch [B, C, H, W] (a new tensor; the input is left as it was)."""
    if not params.mixed:
        return images
    paired = images.flip(0)
    if params.box is not None:
        top, bottom, left, right = params.box
        out = images.clone()
        out[:, :, top:bottom, left:right] = paired[:, :, top:bottom, left:right]
        return out
    return images * params.lam + paired * (1.0 - params.lam)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_c target_c · log softmax(logits)_c`` (computed in fp32)."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class Mixup:
    """Draws :class:`MixParams` per batch and applies them; see the module docstring for the semantics.

    Args:
        num_classes: size of the soft targets.
        mixup_alpha: Beta(α, α) parameter of Mixup; 0 disables Mixup.
        cutmix_alpha: Beta(α, α) parameter of CutMix; 0 disables CutMix.
        prob: probability that a batch is mixed at all.
        switch_prob: with both enabled, the probability of CutMix rather than Mixup.
        label_smoothing: ε of the smoothed one-hot targets.
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.0,
    ) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup / cutmix alphas must be >= 0, got {mixup_alpha} and {cutmix_alpha}")
        if mixup_alpha == 0 and cutmix_alpha == 0:
            raise ValueError("Mixup needs mixup_alpha > 0 or cutmix_alpha > 0")
        for name, p in (("prob", prob), ("switch_prob", switch_prob), ("label_smoothing", label_smoothing)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name}={p} must be in [0, 1]")
        self.num_classes = num_classes
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.prob = prob
        self.switch_prob = switch_prob
        self.label_smoothing = label_smoothing

    def sample(self, height: int, width: int, seed: Sequence[int] | None = None) -> MixParams:
        """Draw one batch's parameters: from ``seed`` (e.g. (run seed, epoch, batch index): the same batch mixes
        alike in any parallel layout and after a resume), or else from torch's global generator."""
        if seed is None:
            seed = [int(torch.randint(0, 2**62, ()))]
        rng = np.random.default_rng([int(s) for s in seed])
        if self.prob < 1.0 and rng.random() >= self.prob:
            return MixParams()
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = rng.random() < self.switch_prob
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        if not use_cutmix:
            return MixParams(lam=lam)
        center_y = int(rng.integers(0, height))
        center_x = int(rng.integers(0, width))
        box, lam = cutmix_box(lam, height, width, center_y, center_x)
        return MixParams(lam=lam, box=box)

    def apply(self, images: torch.Tensor, labels: torch.Tensor, params: MixParams) -> tuple[torch.Tensor, torch.Tensor]:
        """(mixed images, soft targets [B, num_classes]) for given parameters."""
        return mix_images(images, params), mix_targets(labels, self.num_classes, params.lam, self.label_smoothing)

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, seed: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, MixParams]:
        """Draw parameters for this batch (see :meth:`sample`) and apply them: (images, soft targets, parameters)."""
        params = self.sample(images.shape[-2], images.shape[-1], seed)
        mixed, targets = self.apply(images, labels, params)
        return mixed, targets, params
