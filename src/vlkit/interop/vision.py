"""The vision encoder of a NeVA / LLaVA model: one layer's patch features of a pretrained CLIP image tower.

LLaVA feeds the language model the hidden states of a chosen layer (``mm_cfg.vision_encoder.vision_select_layer``,
-2 by default: the penultimate) with the class token dropped. The index follows transformers' ``hidden_states`` of
``CLIPVisionModel(pixels, output_hidden_states=True)``: entry 0 is the embeddings after the pre-norm, entry k the
output of block k, so -1 is the last block's output (before the post-norm) and -2 the one before it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlkit.models.neva import VisionEncoder, hidden_state_index
from vlkit.models.vit import VisionTransformer

# VisionEncoder and hidden_state_index live with the NeVA model (models sit below interop); re-exported here.
__all__ = ["VisionEncoder", "hidden_state_index", "load_vision_tower"]


def _vision_tower(model: nn.Module, path: Path) -> VisionTransformer:
    for name in ("visual", "backbone"):  # CLIPModel, ViTClassifier
        tower = getattr(model, name, None)
        if isinstance(tower, VisionTransformer):
            return tower
    from vlkit.interop.files import ModelFormatError

    raise ModelFormatError(f"{path}: a {type(model).__name__} has no vision tower")


def load_vision_tower(
    path: str | Path, load_model: Callable[..., nn.Module], *, device: str | torch.device = "cpu", **overrides: Any
) -> VisionTransformer:
    """The whole image tower (a :class:`VisionTransformer`, every block) of a pretrained model directory.

    Args:
        path: a vlkit directory (CLIP or ViT classifier), a transformers ``CLIPModel`` or ``CLIPVisionModel``
            directory, or an open_clip directory; recognised by content, as :func:`vlkit.load_model` does.
        load_model: the format dispatcher (:func:`vlkit.interop.native.load_model`), which reads every format but
            a Hugging Face vision tower alone; passed in because the dispatcher itself builds NeVA models from
            pretrained towers (``vlkit.load_vision_tower`` binds it).
        device: where the tower is built.
        **overrides: vision config overrides relative to ``model``, e.g. ``vision__img_h=336, vision__img_w=336``
            (the position table is resampled).

    Raises:
        ModelFormatError: the path holds no model with a vision tower.
    """
    from vlkit.interop.detect import detect_format

    kind, where = detect_format(Path(path))
    if kind in ("hf", "hf_vision"):  # the vision tower alone: the text tower is never built
        from vlkit.interop.hf import load_hf_vision_tower

        return load_hf_vision_tower(where, device=device, **overrides)
    return _vision_tower(load_model(where, device=device, **overrides), where)
