"""Rotary position embeddings (RoPE), in the rotate-half layout of LLaMA / Hugging Face checkpoints."""

from __future__ import annotations

import math

import torch
from torch import nn


def rope_frequencies(head_dim: int, base: float = 10000.0, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies theta_i = base^(-2i/d) for i < d/2, optionally rescaled for long context.

    scaling: None, ``{"type": "linear", "factor": f}`` (positions divided by f) or the LLaMA-3 scheme
    ``{"type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}``.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
    # float32 arithmetic, as Meta's and Hugging Face's code: converted checkpoints get the very frequencies they were
    # trained with (float64 differs by an ulp, which grows to ~1e-4 rad at position 4096).
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("type", scaling.get("rope_type"))
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated smoothly.
        smooth = ((old_ctx / wavelen) - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    raise ValueError(f"unknown rope scaling type {kind!r} (linear | llama3)")


class RotaryEmbedding(nn.Module):
    """Produces (cos, sin) tables of shape [T, head_dim] for positions offset .. offset+T-1."""

    def __init__(self, head_dim: int, base: float = 10000.0, scaling: dict | None = None) -> None:
        super().__init__()
        self.head_dim, self.base, self.scaling = head_dim, base, scaling
        self.register_buffer("inv_freq", rope_frequencies(head_dim, base, scaling), persistent=False)

    def reset_parameters(self, device: torch.device | str | None = None) -> None:
        # Buffers made on the meta device must be recomputed once the module is materialised (on ``device``).
        device = device if device is not None else self.inv_freq.device
        self.inv_freq = rope_frequencies(self.head_dim, self.base, self.scaling).to(device)

    def frequencies(self) -> torch.Tensor:
        """The float32 inverse frequencies; recomputed when ``Module.to(bf16)`` has rounded the buffer."""
        if self.inv_freq.dtype == torch.float32:
            return self.inv_freq
        return rope_frequencies(self.head_dim, self.base, self.scaling).to(self.inv_freq.device)

    def forward(self, seq_len: int, offset: int = 0, dtype: torch.dtype = torch.float32):
        pos = torch.arange(offset, offset + seq_len, device=self.inv_freq.device, dtype=torch.float32)
        angles = torch.outer(pos, self.frequencies())
        emb = torch.cat([angles, angles], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def at(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32):
        """(cos, sin) of shape [B, 1, T, head_dim] for per-row positions [B, T] (left-padded batches, KV caches)."""
        angles = positions[..., None].float() * self.frequencies()
        emb = torch.cat([angles, angles], dim=-1).unsqueeze(-3)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q and k ([B, H, T, d]) by position: x * cos + rotate_half(x) * sin (cos/sin [T, d] or [B, 1, T, d])."""
    return (q * cos + rotate_half(q) * sin).to(q.dtype), (k * cos + rotate_half(k) * sin).to(k.dtype)
