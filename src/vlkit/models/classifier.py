"""ViT image classifier: a VisionTransformer backbone (no projection), dropout, and a linear head."""

from __future__ import annotations

import torch
from torch import nn

from vlkit.config.schema import ModelConfig
from vlkit.models.vit import VisionTransformer


class ViTClassifier(nn.Module):
    """Pools the class token (or averages patches with ``global_average_pool``) into ``num_classes`` logits."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        if cfg.vision.output_dim is not None:
            raise ValueError("a classifier's backbone has no projection: leave model.vision.output_dim unset")
        self.backbone = VisionTransformer(cfg.vision)
        self.head_drop = nn.Dropout(cfg.vision.hidden_dropout)
        self.head = nn.Linear(cfg.vision.hidden_size, cfg.num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        self.backbone.init_weights()
        # A zero head starts every class at equal probability (timm's default for fine-tuning heads).
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(pixels)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = self.backbone.pool(tokens)
        return pooled if pre_logits else self.head(self.head_drop(pooled))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> logits [B, num_classes]."""
        return self.forward_head(self.forward_features(pixels))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}
