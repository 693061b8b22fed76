"""Contrastive losses: exact bidirectional InfoNCE (naive, tiled, fused, ring) and the SigLIP sigmoid loss.

The entry point is :func:`contrastive_loss` (or the :class:`ContrastiveLoss` module); the
implementation modules can also be used directly.
"""

from vlkit.losses.contrastive import IMPLS, ContrastiveLoss, contrastive_loss, fused_status
from vlkit.losses.naive import naive_contrastive_loss
from vlkit.losses.ring import ring_contrastive_loss
from vlkit.losses.siglip import SigLipLoss, naive_siglip_loss, siglip_loss, tiled_siglip_loss
from vlkit.losses.tiled import tiled_contrastive_loss

__all__ = [
    "IMPLS",
    "ContrastiveLoss",
    "SigLipLoss",
    "contrastive_loss",
    "fused_status",
    "naive_contrastive_loss",
    "naive_siglip_loss",
    "ring_contrastive_loss",
    "siglip_loss",
    "tiled_contrastive_loss",
    "tiled_siglip_loss",
]
