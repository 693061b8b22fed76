"""The vision encoder of a NeVA / LLaVA model: one layer's patch features of a pretrained CLIP image tower.

LLaVA feeds the language model the hidden states of a chosen layer (``mm_cfg.vision_encoder.vision_select_layer``,
-2 by default: the penultimate) with the class token dropped. The index follows transformers' ``hidden_states`` of
``CLIPVisionModel(pixels, output_hidden_states=True)``: entry 0 is the embeddings after the pre-norm, entry k the
output of block k, so -1 is the last block's output (before the post-norm) and -2 the one before it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlkit.config.schema import VisionConfig
from vlkit.models.vit import VisionTransformer


def hidden_state_index(select_layer: int, num_layers: int) -> int:
    """The number of blocks to run for transformers' ``hidden_states[select_layer]`` of a ``num_layers`` tower."""
    index = select_layer if select_layer >= 0 else num_layers + 1 + select_layer
    if not 0 <= index <= num_layers:
        raise ValueError(
            f"select_layer={select_layer} is outside the {num_layers + 1} hidden states of a {num_layers}-layer "
            f"tower (valid: {-(num_layers + 1)}..{num_layers})"
        )
    return index


class VisionEncoder(nn.Module):
    """A CLIP image tower cut after the selected layer: ``forward(pixels [B, 3, H, W]) -> [B, tokens, hidden_size]``.

    Blocks after the selected one, the final norm and the projection are dropped (never run, no parameters), so
    the module can be trained or frozen as a whole. ``tokens`` is the patch count, plus the class token(s) when
    they are kept.

    Attributes:
        config: the VisionConfig of what is kept (``num_layers`` = blocks run, no ``output_dim``).
        hidden_size: the feature size (the NeVA projector's input).
        select_layer: the index this encoder was cut at, as given.
    """

    def __init__(self, tower: VisionTransformer, select_layer: int = -2, drop_class_token: bool = True) -> None:
        super().__init__()
        keep = hidden_state_index(select_layer, tower.config.num_layers)
        tower.transformer.blocks = tower.transformer.blocks[:keep]
        tower.norm = nn.Identity()
        tower.proj = None
        tower.config = replace(tower.config, num_layers=keep, output_dim=None)
        self.tower = tower
        self.config: VisionConfig = tower.config
        self.hidden_size = tower.config.hidden_size
        self.select_layer = select_layer
        self.drop_class_token = drop_class_token

    @property
    def num_patches(self) -> int:
        return self.config.num_patches

    @property
    def num_tokens(self) -> int:
        return self.num_patches + (0 if self.drop_class_token else self.tower.num_prefix_tokens)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.tower.transformer(self.tower.embed(pixels))
        return x[:, self.tower.num_prefix_tokens :] if self.drop_class_token else x

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.tower.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        return {f"tower.{n}" for n in self.tower.no_weight_decay()}


def _vision_tower(model: nn.Module, path: Path) -> VisionTransformer:
    for name in ("visual", "backbone"):  # CLIPModel, ViTClassifier
        tower = getattr(model, name, None)
        if isinstance(tower, VisionTransformer):
            return tower
    from vlkit.interop.native import ModelFormatError

    raise ModelFormatError(f"{path}: a {type(model).__name__} has no vision tower")


def load_vision_encoder(
    path: str | Path,
    select_layer: int = -2,
    drop_class_token: bool = True,
    *,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> VisionEncoder:
    """The patch features of one layer of a pretrained image tower, for NeVA's projector.

    Args:
        path: a vlkit directory (CLIP or ViT classifier), a transformers ``CLIPModel`` or ``CLIPVisionModel``
            directory, or an open_clip directory; recognised by content, as :func:`vlkit.load_model` does.
        select_layer: transformers' ``hidden_states`` index (see the module docstring); -2: the penultimate block.
        drop_class_token: return the patch tokens only.
        device: where the encoder is built.
        **overrides: vision config overrides relative to ``model``, e.g. ``vision__img_h=336, vision__img_w=336``
            (the position table is resampled).

    Returns:
        A plain, trainable :class:`VisionEncoder` (freeze it yourself); ``.config``, ``.hidden_size``.

    Raises:
        ModelFormatError: the path holds no model with a vision tower.
        ValueError: ``select_layer`` outside the tower's hidden states.
    """
    from vlkit.interop.native import detect_format, load_model

    path = Path(path)
    kind, where = detect_format(path)
    if kind in ("hf", "hf_vision"):  # the vision tower alone: the text tower is never built
        from vlkit.interop.hf import load_hf_vision_tower

        tower = load_hf_vision_tower(where, device=device, **overrides)
    else:
        tower = _vision_tower(load_model(where, device=device, **overrides), where)
    return VisionEncoder(tower, select_layer, drop_class_token)
