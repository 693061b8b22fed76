"""Capture and restore the process's random generators as plain JSON, so a resumed run draws the same numbers.

Covers Python's ``random``, NumPy's legacy global generator, torch's CPU generator and, when CUDA is in use, the
generator of every CUDA device. Generators owned by data-loader workers or by user objects
(``np.random.default_rng``, ``torch.Generator``) are not global and belong to whoever owns them.
"""

from __future__ import annotations

import base64
import random
import warnings
from typing import Any

import numpy as np
import torch


def _tensor_to_b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().contiguous().numpy().tobytes()).decode("ascii")


def _b64_to_tensor(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def capture_rng_state() -> dict[str, Any]:
    """The state of this process's global random generators, as a JSON-serialisable dict.

    CUDA generators are captured only when CUDA is already initialised: initialising it here would create a
    context on every visible device from every rank.

    Returns:
        ``{"python": ..., "numpy": ..., "torch": ..., "cuda": [...]}`` with only lists, numbers and strings
        (torch states are base64 of their byte tensors); ``"cuda"`` is absent when CUDA is not in use.
    """
    version, internal, gauss_next = random.getstate()
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": name,
            "key": [int(k) for k in key],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": _tensor_to_b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_tensor_to_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put the generators back to a state from :func:`capture_rng_state`.

    Generators missing from ``state`` are left alone. Saved CUDA states are restored onto as many devices as both
    the save and this process have; a different device count is warned about, as those streams cannot match.

    Args:
        state: the dict :func:`capture_rng_state` returned (possibly after a JSON round trip).
    """
    if "python" in state:
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    if "numpy" in state:
        npy = state["numpy"]
        key = np.asarray(npy["key"], dtype=np.uint32)
        np.random.set_state((npy["bit_generator"], key, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    if "torch" in state:
        torch.set_rng_state(_b64_to_tensor(state["torch"]))
    saved_cuda = state.get("cuda")
    if saved_cuda and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if count != len(saved_cuda):
            warnings.warn(
                f"checkpoint has CUDA RNG states for {len(saved_cuda)} devices, this process sees {count}: "
                f"restoring the first {min(count, len(saved_cuda))}; random streams on the others will differ",
                stacklevel=2,
            )
        for device, s in enumerate(saved_cuda[:count]):
            torch.cuda.set_rng_state(_b64_to_tensor(s), device)
    elif saved_cuda:
        warnings.warn("checkpoint has CUDA RNG states but CUDA is not available here; they are ignored", stacklevel=2)
