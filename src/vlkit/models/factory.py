"""Build a model from a preset name, a YAML file or a config object."""

from __future__ import annotations

import contextlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlkit.config import Config, ModelConfig, apply_overrides, load_config
from vlkit.models.classifier import ViTClassifier
from vlkit.models.clip import CLIPModel
from vlkit.models.llama import LlamaForCausalLM
from vlkit.models.neva import NevaModel

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "clip": CLIPModel,
    "vit_classifier": ViTClassifier,
    "llama": LlamaForCausalLM,
    "neva": NevaModel,
}


def resolve_model_config(name_or_config: str | Path | Config | ModelConfig | dict, **overrides: Any) -> ModelConfig:
    """The validated model section for a preset / YAML path / config object, with overrides relative to ``model``.

    Override keys may be dotted (``**{"vision.num_layers": 2}``) or use ``__`` (``vision__num_layers=2``).
    """
    model_overrides = {"model." + k.replace("__", "."): v for k, v in overrides.items()}
    if isinstance(name_or_config, (str, Path)):
        return load_config(name_or_config, model_overrides).model
    if isinstance(name_or_config, Config):
        cfg = name_or_config
    elif isinstance(name_or_config, ModelConfig):
        cfg = Config(model=name_or_config)
    elif isinstance(name_or_config, dict):
        cfg = apply_overrides(Config(), {"model": name_or_config})
    else:
        raise TypeError(f"cannot build a model from a {type(name_or_config).__name__}")
    return apply_overrides(cfg, model_overrides).model


def create_model(
    name_or_config: str | Path | Config | ModelConfig | dict,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> nn.Module:
    """A freshly initialised model. ``device="meta"`` builds it without allocating weights (for counting).

    Example: ``create_model("clip-b16")``, ``create_model("clip-tiny", output_dim=32, vision__num_layers=1)``.
    """
    cfg = resolve_model_config(name_or_config, **overrides)
    cls = MODEL_CLASSES.get(cfg.arch)
    if cls is None:
        raise NotImplementedError(f"model.arch={cfg.arch!r} is not available yet (have: {', '.join(MODEL_CLASSES)})")
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = cls(cfg)
    if dtype is not None:
        model = model.to(dtype)
    return model


def model_config_dict(model: nn.Module) -> dict:
    """The plain-dict model config a model was built from (what checkpoints store)."""
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"{type(model).__name__} carries no vlkit ModelConfig (was it built by create_model?)")
    return asdict(cfg)
