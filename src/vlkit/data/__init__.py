"""Data: shards, tokenizers, transforms, conversations and synthetic datasets (imported lazily: no torch at import)."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "get_tokenizer": "vlkit.data.tokenizer",
    "get_transform": "vlkit.data.transforms",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vlkit.data' has no attribute {name!r}")
