"""Weight formats, bottom up: shared file helpers (files.py), trainer checkpoint files (checkpoint_files.py), what a
path holds (detect.py); the formats: Hugging Face transformers CLIP (hf.py), LLaMA (hf_llama.py) and LLaVA
(hf_llava.py), open_clip (open_clip.py), a pretrained vision tower (vision.py), NeVA from pretrained parts (neva.py);
on top vlkit's own directories and the format dispatcher ``load_model`` (native.py), and ``vlkit convert`` (cli.py).
The part loaders (vision.py, neva.py) take the dispatcher as an argument: a part may be stored in any format.

Imported lazily, so that ``vlkit --help`` (which registers ``vlkit convert``) does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelFormatError": "vlkit.interop.native",
    "detect_format": "vlkit.interop.native",
    "load_model": "vlkit.interop.native",
    "load_state_dict": "vlkit.interop.native",
    "save_model": "vlkit.interop.native",
    "load_hf": "vlkit.interop.hf",
    "save_hf": "vlkit.interop.hf",
    "convert_hf_to_vlkit": "vlkit.interop.hf",
    "load_open_clip": "vlkit.interop.open_clip",
    "save_open_clip": "vlkit.interop.open_clip",
    "load_vision_encoder": "vlkit.interop.native",
    "VisionEncoder": "vlkit.interop.vision",
    "load_vision_tower": "vlkit.interop.native",
    "load_hf_llava": "vlkit.interop.hf_llava",
    "convert_llava_to_vlkit": "vlkit.interop.hf_llava",
    "build_neva_model": "vlkit.interop.native",
    "load_adapter": "vlkit.interop.neva",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vlkit.interop' has no attribute {name!r}")
