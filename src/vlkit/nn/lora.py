"""LoRA (Hu et al., 2021): a trainable low-rank update ``W + (alpha / r) B A`` beside a frozen ``nn.Linear``.

:class:`LoRALinear` *is* an ``nn.Linear`` (the layer's class is swapped in place), so the base keeps its parameter
objects and state-dict names (``...attn.qkv.weight``): pretrained weights load into it, tensor-parallel plans find it
by its old name, and merging only folds the update in and swaps the class back. The adapter adds two parameters,
``lora_A`` [r, in] (Kaiming-uniform, as ``peft``) and ``lora_B`` [out, r] (zeros), so at initialisation the layer
computes exactly what the base does. Dropout acts on the adapter's input only.

A fused layer (the attention's ``qkv``: queries, keys and values in one Linear) gets one adapter over its whole
output, as ``peft`` does on fused layers: one A shared by q, k and v, one B whose rows cover all three.

Which layers: the names of the projections inside transformer blocks (:data:`LORA_TARGETS`), optionally prefixed by
a tower (``vision_tower.qkv``); see :func:`apply_lora`. Nothing here knows about distribution: tensor parallel shards
the adapter from :mod:`vlkit.parallel.parallelize`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

# The projections of vlkit's transformer blocks (vlkit.nn.attention / vlkit.nn.mlp): attention's fused input and its
# output, SwiGLU's gate / up / down (LLaMA), the GELU MLP's fc1 / fc2 (ViT / CLIP towers).
LORA_TARGETS = ("qkv", "proj", "gate", "up", "down", "fc1", "fc2")
ADAPTER_SUFFIXES = (".lora_A", ".lora_B")


class LoRALinear(nn.Linear):
    """``y = x W^T + b + scaling * dropout(x) A^T B^T`` with ``scaling = alpha / rank``. Made from an existing
    ``nn.Linear`` by :meth:`wrap` (not constructed directly)."""

    rank: int
    scaling: float

    @classmethod
    def wrap(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> LoRALinear:
        """Turn ``linear`` into a LoRALinear in place (same object, same base parameters) and return it."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"LoRA wraps a plain nn.Linear, got {type(linear).__name__}")
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        w = linear.weight
        # Adapters train in fp32 beside a half-precision base (as peft): a bf16 lora_A would round away most
        # updates of LoRA's small learning rates (and there is no fp32 master copy of a parameter).
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        linear.__class__ = cls
        linear.rank, linear.scaling = int(rank), float(alpha) / rank
        linear.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, device=w.device, dtype=dtype))
        linear.lora_B = nn.Parameter(torch.empty(linear.out_features, rank, device=w.device, dtype=dtype))
        linear.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        linear.reset_lora()
        return linear

    def reset_lora(self) -> None:
        """A: Kaiming-uniform (nn.Linear's own init, as peft); B: zeros, so the adapter starts as no change."""
        if self.lora_A.device.type == "meta":
            return
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        h = self.lora_dropout(x)
        if h.dtype != self.lora_A.dtype and not torch.is_autocast_enabled(h.device.type):
            h = h.to(self.lora_A.dtype)  # a half-precision input to the fp32 adapters (autocast casts by itself)
        update = F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling
        return out + update.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B A`` [out, in]: what merging adds to the base weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def merge(self) -> nn.Linear:
        """Fold the update into the base weight and become a plain ``nn.Linear`` again (in place); returns self."""
        with torch.no_grad():  # in fp32, then rounded once to the base's dtype
            self.weight.copy_((self.weight.float() + self.delta_weight().float()).to(self.weight.dtype))
        for name in ("lora_A", "lora_B"):
            delattr(self, name)
        del self.lora_dropout, self.rank, self.scaling
        self.__class__ = nn.Linear
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora_rank={self.rank}, lora_scaling={self.scaling:g}"


def split_target(target: str) -> tuple[str | None, str]:
    """``"vision_tower.qkv"`` -> ``("vision_tower", "qkv")``; ``"qkv"`` -> ``(None, "qkv")``."""
    tower, _, name = target.rpartition(".")
    return tower or None, name


def apply_lora(
    model: nn.Module,
    targets: Iterable[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    *,
    default_towers: Iterable[str],
) -> list[str]:
    """Wrap the projections ``targets`` names in LoRA adapters; returns the wrapped layers' names.

    A target is a projection name (:data:`LORA_TARGETS`), applied in each of ``default_towers`` (attribute paths of
    ``model``, e.g. ``("llm",)``), or ``tower.name`` for another tower of ``model`` (``vision_tower.qkv``). Only Linear
    layers inside transformer blocks (``...blocks.<i>...``) are wrapped, never heads or projectors.

    Raises:
        ValueError: a target names no projection of its tower (the message lists what the tower has).
    """
    default_towers = tuple(default_towers)
    wanted: dict[str, set[str]] = {}
    for target in targets:
        tower, name = split_target(target)
        for t in (tower,) if tower else default_towers:
            wanted.setdefault(t, set()).add(name)
    wrapped = []
    for tower, names in wanted.items():
        module = model.get_submodule(tower)
        found = {}
        for sub_name, sub in module.named_modules():
            leaf = sub_name.rpartition(".")[2]
            if ".blocks." in f".{sub_name}" and type(sub) is nn.Linear and leaf in LORA_TARGETS:
                found.setdefault(leaf, []).append((sub_name, sub))
        missing = sorted(names - set(found))
        if missing:
            raise ValueError(
                f"model.peft.lora.target_modules: {tower} has no {', '.join(missing)} projection (it has "
                f"{', '.join(sorted(found))})"
            )
        for name in sorted(names):
            for sub_name, sub in found[name]:
                LoRALinear.wrap(sub, rank, alpha, dropout)
                wrapped.append(f"{tower}.{sub_name}")
    return sorted(wrapped)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRA layer of ``model`` by its module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def is_adapter_key(key: str) -> bool:
    """A state-dict key of an adapter parameter (``...lora_A`` / ``...lora_B``)."""
    return key.endswith(ADAPTER_SUFFIXES)


def mark_only_lora_trainable(module: nn.Module) -> None:
    """Freeze every parameter of ``module`` except its adapters."""
    for name, p in module.named_parameters():
        p.requires_grad_(is_adapter_key(name))


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter of ``model`` into its base weight (plain ``nn.Linear`` layers again); returns how many."""
    layers = lora_layers(model)
    for layer in layers.values():
        layer.merge()
    return len(layers)


def merge_lora_state_dict(state: dict[str, torch.Tensor], scalings: dict[str, float]) -> dict[str, torch.Tensor]:
    """A state dict with adapters (``<layer>.lora_A`` / ``.lora_B``) as the plain model's: each ``<layer>.weight``
    plus ``scalings[<layer>] * B A`` (computed in fp32, stored in the weight's dtype), adapter entries dropped.

    Raises:
        KeyError: an adapter without its base weight, its pair, or its scaling.
    """
    out = {k: v for k, v in state.items() if not is_adapter_key(k)}
    for key in state:
        if not key.endswith(".lora_A"):
            continue
        layer = key[: -len(".lora_A")]
        weight = out[f"{layer}.weight"]
        a, b = state[key].float(), state[f"{layer}.lora_B"].float()
        out[f"{layer}.weight"] = (weight.float() + (b @ a) * scalings[layer]).to(weight.dtype)
    return out
