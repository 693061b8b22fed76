"""vlkit: pretrain, fine-tune, evaluate and serve vision-language models (CLIP, ViT, NeVA) with PyTorch.

The public API is imported lazily so that ``vlkit --help`` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "create_model": "vlkit.models.factory",
    "load_model": "vlkit.interop.native",
    "save_model": "vlkit.interop.native",
    "load_vision_encoder": "vlkit.interop.native",
    "load_config": "vlkit.config",
    "get_tokenizer": "vlkit.data.tokenizer",
    "get_transform": "vlkit.data.transforms",
    "ConfigError": "vlkit.config",
    "list_models": "vlkit.catalog",
    "create_model_and_transforms": "vlkit.catalog",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vlkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    # The lazy exports are not in the module's namespace until first used; tab completion and dir() should see them.
    return sorted({*globals(), *__all__})
