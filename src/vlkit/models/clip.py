"""CLIP: an image tower and a text tower projected into one space, compared with a learnable temperature."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.config.schema import ModelConfig
from vlkit.models.text import TextTransformer
from vlkit.models.vit import VisionTransformer


class CLIPModel(nn.Module):
    """``encode_image`` / ``encode_text`` give unnormalised [B, D] features; ``forward`` gives normalised ones.

    The logit scale is stored as its log, initialised to ln(1/0.07) and clamped at ``logit_scale_max``
    (ln 100) when used, as OpenAI and open_clip do.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.text is None:
            raise ValueError("a CLIP model needs model.text")
        self.config = cfg
        self.visual = VisionTransformer(cfg.vision)
        self.text = TextTransformer(cfg.text)
        # Shape [1], not a scalar: FSDP2 cannot shard 0-d parameters. scale() returns a 0-d tensor.
        self.logit_scale = nn.Parameter(torch.full((1,), float(cfg.logit_scale_init)))

    def init_weights(self) -> None:
        self.visual.init_weights()
        self.text.init_weights()
        with torch.no_grad():
            self.logit_scale.fill_(float(self.config.logit_scale_init))

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.visual(pixels)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.text(ids)
        return F.normalize(x, dim=-1) if normalize else x

    def scale(self) -> torch.Tensor:
        """exp(logit_scale) clamped at exp(logit_scale_max); the gradient stops only above the clamp."""
        # Squeezed before the arithmetic, so the result is a new tensor, not a view (FSDP2 warns about views).
        return self.logit_scale.squeeze(0).clamp(max=self.config.logit_scale_max).exp()

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "image_features": self.encode_image(pixels, normalize=True),
            "text_features": self.encode_text(ids, normalize=True),
            "logit_scale": self.scale(),
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        names = {"logit_scale"}
        names |= {f"visual.{n}" for n in self.visual.no_weight_decay()}
        names |= {f"text.{n}" for n in self.text.no_weight_decay()}
        return names
